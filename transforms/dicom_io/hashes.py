"""Hashes of a local DICOM instance, as the published dataset records them.

`instance_hash` is the MD5 of the whole file (IDC's `instance_hash`); the PixelData hash is the
SHA-512 of the PixelData value as stored. Both are streamed in 4 MiB blocks.
"""

from __future__ import annotations

import hashlib
import struct

from transforms.dicom_io.byte_ranges import DicomInstanceReader
from transforms.errors import ReasonCode, SlideError

_BLOCK = 1 << 22
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)


def instance_hashes(path: str) -> tuple[str, str]:
    """(MD5 of the instance file, SHA-512 of its PixelData value as stored), both streamed in
    4 MiB blocks: the value of an encapsulated PixelData is its items, headers included, up to
    the sequence delimiter (what pydicom returns as `PixelData`)."""
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            md5.update(block)
    value_at, value_length = DicomInstanceReader(path).pixel_data_value()
    sha512 = hashlib.sha512()
    with open(path, "rb") as handle:
        handle.seek(value_at)
        if value_length != 0xFFFFFFFF:  # native pixels: one value of known length
            _copy(handle, value_length, sha512)
        else:
            while len(header := handle.read(8)) == 8:
                group, element, length = struct.unpack("<HHI", header)
                if (group, element) == _SEQUENCE_DELIMITER:
                    break
                sha512.update(header)
                _copy(handle, length, sha512)
    return md5.hexdigest(), sha512.hexdigest()


def _copy(handle, length: int, digest) -> None:
    while length > 0:
        block = handle.read(min(length, _BLOCK))
        if not block:
            raise SlideError(ReasonCode.INCOMPLETE_SLIDE, f"{handle.name}: PixelData truncated")
        digest.update(block)
        length -= len(block)
