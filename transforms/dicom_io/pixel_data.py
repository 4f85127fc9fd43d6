"""The PixelData value of a local DICOM instance: the frames it really holds, and its hashes.

`stored_frames_problem` checks NumberOfFrames against what PixelData holds before any pixel is
read. `instance_hash` is the MD5 of the whole file (IDC's `instance_hash`); the PixelData hash
is the SHA-512 of the PixelData value as stored. Both are streamed in 4 MiB blocks.
"""

from __future__ import annotations

import hashlib
import os
import struct

from transforms.dicom_io import pixel_hash
from transforms.dicom_io.byte_ranges import DicomInstanceReader
from transforms.errors import ReasonCode, SlideError

_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian
_SEQ_END = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD)
_UNDEFINED = 0xFFFFFFFF
_BLOCK = 1 << 22


def instance_hashes(path: str) -> tuple[str, str]:
    """(MD5 of the instance file, SHA-512 of its PixelData value as stored), both streamed in
    4 MiB blocks; the SHA-512 is pixel_hash's, the one used for remote instances too."""
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            md5.update(block)
    value_at, value_length = DicomInstanceReader(path).pixel_data_value()
    with open(path, "rb") as handle:
        handle.seek(value_at)
        blocks = iter(lambda: handle.read(_BLOCK), b"")
        sha512 = pixel_hash.sha512_of_value(blocks, value_length, path)
    return md5.hexdigest(), sha512


def stored_frames_problem(path: str, declared: int) -> SlideError | None:
    """Whether a local file's PixelData holds the `declared` number of frames, whole.

    Encapsulated: the items are walked (8-byte reads) up to the sequence delimiter; the frames
    are the Extended Offset Table's, else the Basic Offset Table's entries (each must point at
    an item), else one per fragment. Native: the value length is frames x frame size.
    """
    where = f"instance file {path}"
    try:
        reader = DicomInstanceReader(path)
        value_at, length = reader.pixel_data_value()
    except Exception as exc:  # no PixelData, unreadable header: said in the row
        return SlideError(ReasonCode.MALFORMED_HEADER, f"{where} has no readable PixelData ({exc})")
    size = os.path.getsize(path)
    header = reader.header
    with open(path, "rb") as handle:
        if length != _UNDEFINED:  # native pixels
            frame = (
                int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel", 1))
                * (int(header.get("BitsAllocated", 8)) // 8)
            )  # fmt: skip
            if value_at + length > size:
                return SlideError(
                    ReasonCode.TRUNCATED_PIXEL_DATA,
                    f"{where} is cut short: PixelData declares {length} bytes, the file holds "
                    f"{size - value_at} of them "
                    f"({(size - value_at) // frame} of {declared} frames)",
                )
            if length < declared * frame or length // frame != declared:
                return SlideError(
                    ReasonCode.INCONSISTENT_FRAMES,
                    f"{where} declares NumberOfFrames {declared}, but its PixelData holds "
                    f"{length / frame:g} frames of {frame} bytes",
                )
            return None
        items: list[tuple[int, int]] = []
        position, ended = value_at, False
        while position + 8 <= size:
            head = os.pread(handle.fileno(), 8, position)
            if head[:4] == _SEQ_END:
                ended = True
                break
            if head[:4] != _ITEM:
                break
            item_length = struct.unpack("<I", head[4:8])[0]
            items.append((position, item_length))
            position += 8 + item_length
    if not ended or position > size:
        whole = max(0, len(items) - 1 - (position > size))
        return SlideError(
            ReasonCode.TRUNCATED_PIXEL_DATA,
            f"{where} is cut short: its PixelData ends after {whole} whole fragments, without "
            f"the sequence delimiter; the header declares {declared} frames",
        )
    if not items:
        return SlideError(ReasonCode.MALFORMED_HEADER, f"{where}: PixelData has no items")
    bot_at, bot_length = items[0]
    fragments = items[1:]
    first = bot_at + 8 + bot_length
    starts = {start - first for start, _ in fragments}
    eot = header.get("ExtendedOffsetTable")
    if eot is not None:
        offsets = [int.from_bytes(bytes(eot)[k : k + 8], "little") for k in range(0, len(eot), 8)]
        how = "Extended Offset Table"
    elif bot_length:
        table = reader.read_bytes(bot_at + 8, first)
        offsets = [int.from_bytes(table[k : k + 4], "little") for k in range(0, len(table), 4)]
        how = "Basic Offset Table"
    else:
        offsets = sorted(starts)
        how = "fragments"
    if len(offsets) != declared:
        return SlideError(
            ReasonCode.INCONSISTENT_FRAMES,
            f"{where} declares NumberOfFrames {declared}, but its PixelData holds "
            f"{len(offsets)} frames ({how}; {len(fragments)} fragments)",
        )
    if any(o not in starts for o in offsets):
        return SlideError(
            ReasonCode.INCONSISTENT_FRAMES,
            f"{where}: its {how} points at bytes that are not the start of a fragment",
        )
    return None
