"""Stand-in SavedModels with Path Foundation's serving signature, for runs without the real model.

Path Foundation is gated on Hugging Face and cannot be fetched offline, so tests, demos and
benchmarks use these instead. Each stub is a TF SavedModel whose `serving_default` signature
matches the real one: input `inputs` float32 [batch, 224, 224, 3] RGB in [0, 1], output
`output_0` float32 [batch, 384]. Weights are fixed pseudo-random numbers from
`numpy.random.default_rng(seed)`, so every build of a stub computes the same function.

* `stub-tiny`: a small conv net, fast on CPU, whose embeddings depend on colour and texture
  (each layer is normalised on a fixed set of synthetic images, like a frozen batch norm, so
  the features are centred and different tissues land in clearly different directions).
* `stub-vit-s16`: a ViT-S/16-sized transformer (the architecture class of Path Foundation)
  with random weights; its embeddings mean nothing, it only gives realistic compute.

Neither is Path Foundation; outputs made with them are labelled as stand-ins (see
`models.path_foundation.ModelInfo`). The networks themselves are in `models.stub_nets`; this
module imports TensorFlow only when it builds one.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

STUB_MODELS: dict[str, str] = {
    "stub-tiny": "small conv net with fixed random weights; fast on CPU; NOT Path Foundation",
    "stub-vit-s16": (
        "ViT-S/16-sized transformer with fixed random weights, for realistic compute in "
        "benchmarks; NOT Path Foundation"
    ),
}
# Bump when a stub's architecture or weights change: it is part of the recorded model version.
STUB_VERSIONS: dict[str, int] = {"stub-tiny": 1, "stub-vit-s16": 1}

# Written inside each stub's SavedModel directory (TF ignores `assets.extra/`), so a stub
# directory passed as a local model path is still recognised and labelled as a stand-in.
MARKER_PATH = pathlib.Path("assets.extra") / "pathembed_stub.json"


def stub_version(name: str) -> str:
    """The version string recorded for a stub's outputs."""
    return f"{name}-v{STUB_VERSIONS[name]} (fixed random weights; NOT Path Foundation)"


def read_marker(model_dir: pathlib.Path) -> dict[str, str] | None:
    """The stub marker of a SavedModel directory, or None if it was not built here."""
    try:
        return json.loads((model_dir / MARKER_PATH).read_text())
    except (OSError, ValueError):
        return None


def build_stub(name: str, export_dir: pathlib.Path) -> pathlib.Path:
    """Writes stub `name` as a SavedModel at `export_dir` and returns `export_dir`.

    The model is written to a temporary directory beside `export_dir` and renamed into place,
    so concurrent readers never see half a model. If `export_dir` appears meanwhile (another
    process built the same stub), that copy is kept: builds are deterministic.
    """
    if name not in STUB_MODELS:
        raise ValueError(f"unknown stub model {name!r}; choose one of {sorted(STUB_MODELS)}")
    export_dir = pathlib.Path(export_dir)
    import tensorflow as tf

    from models import stub_nets

    export_dir.parent.mkdir(parents=True, exist_ok=True)
    module = stub_nets.TinyConvNet() if name == "stub-tiny" else stub_nets.VitS16()
    tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.", dir=export_dir.parent))
    try:
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; the model is not
        tf.saved_model.save(module, str(tmp_dir), signatures={"serving_default": module.serve})
        marker = {"name": name, "version": stub_version(name)}
        (tmp_dir / MARKER_PATH).parent.mkdir(exist_ok=True)
        (tmp_dir / MARKER_PATH).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(tmp_dir, export_dir)
        except OSError:
            if read_marker(export_dir) != marker:
                raise FileExistsError(
                    f"{export_dir} exists and is not a {stub_version(name)} build; remove it"
                ) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return export_dir
