"""Path Foundation's serving signature: what every model the pipeline runs must accept and give.

`serving_default` takes `inputs`, float32 [batch, 224, 224, 3] RGB in [0, 1], and returns
`output_0`, float32 [batch, 384]. The real model, the stand-ins (models/stubs.py) and the
tables' embedding column (transforms/outputs/tables.py) all take these numbers from here.
"""

PATCH_SIZE = 224
EMBEDDING_DIM = 384
INPUT_NAME = "inputs"
OUTPUT_KEY = "output_0"
