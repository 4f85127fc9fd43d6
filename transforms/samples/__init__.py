"""Synthetic DICOM WSI sample slides (deterministic, not real tissue) for demos, tests, benches."""
