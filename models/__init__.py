"""The embedding model: Path Foundation from Hugging Face, a local SavedModel, or a stand-in.

* `models.path_foundation`: `resolve_model()`, `ModelInfo`, `ModelAccessError`, `load_embedder()`.
* `models.handler`: `PathFoundationModelHandler` for Beam's `RunInference`.
* `models.stubs`: `build_stub()` and `STUB_MODELS`, stand-ins with Path Foundation's signature.

Importing this package does not import TensorFlow or Beam; import the submodules you need.
"""
