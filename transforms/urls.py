"""Where a path points: the one test for "is this a local path or a URL" used everywhere."""

from __future__ import annotations


def is_remote(uri: str) -> bool:
    """True for a URL (gs://, s3://, http(s)://, a WADO-RS instance URL), False for a local
    path: local paths are resolved, created with os.makedirs and read with plain file I/O."""
    return "://" in uri
