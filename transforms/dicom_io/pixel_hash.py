"""SHA-512 of an instance's PixelData value, streamed in large sequential blocks.

The seed's metadata.json has `instance_pixeldata_SHA512_hash` for every slide: the SHA-512 of
the PixelData value of the instance the embeddings were made from, as stored (what pydicom
returns as `ds.PixelData`: for encapsulated pixel data, every item, its 8-byte header included,
up to the sequence delimiter; for native pixel data, the value of known length).

Computing it costs reading the whole value once, so it is an option (`hashing.pixeldata_sha512`,
on in configs/idc.yaml). Memory is bounded by the block size whatever the instance size: the
value is hashed block by block as it arrives and never held whole.

* files, gs://, s3:// and http(s):// objects (`sha512_from_uri`): the header is read by ranges
  (transforms/byte_ranges.py), then the value in `block`-sized range reads, in order;
* DICOMweb (`sha512_from_dicomweb`): the instance is streamed once (WADO-RS retrieve instance,
  untranscoded, `transfer-syntax=*`); the header is parsed from the first bytes, then the value
  is hashed from the same stream.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator

import pydicom

from transforms.dicom_io import byte_ranges, dicomweb, retry
from transforms.errors import ReasonCode, SlideError

BLOCK = 16 * 1024 * 1024  # bytes per sequential read: few requests, bounded memory
UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
_LONG_VRS = (b"OB", b"OW", b"UN", b"OD", b"OF", b"OV")
_MAX_HEADER = 256 * 1024 * 1024  # a DICOM header larger than this is not a header


class _Blocks:
    """Sequential consumer of an iterator of byte blocks; holds one block at a time."""

    def __init__(self, blocks: Iterable[bytes], what: str):
        self._blocks = iter(blocks)
        self._block = memoryview(b"")
        self._what = what
        self.consumed = 0

    def _next(self) -> bool:
        for block in self._blocks:
            if block:
                self._block = memoryview(block)
                return True
        return False

    def take(self, n: int) -> bytes:
        """The next n bytes (fewer only at the end of the stream)."""
        out = bytearray()
        while len(out) < n and (self._block or self._next()):
            part = self._block[: n - len(out)]
            out += part
            self._block = self._block[len(part) :]
        self.consumed += len(out)
        return bytes(out)

    def feed(self, n: int, digest) -> None:
        """Hashes the next n bytes into `digest`."""
        while n > 0:
            if not self._block and not self._next():
                raise SlideError(ReasonCode.READ_ERROR, f"{self._what}: PixelData truncated")
            part = self._block[:n]
            digest.update(part)
            self._block = self._block[len(part) :]
            n -= len(part)
            self.consumed += len(part)


def sha512_of_value(blocks: Iterable[bytes], length: int, what: str = "instance") -> str:
    """SHA-512 of a PixelData value whose bytes `blocks` yield in order from its first byte.

    `length`: the value length from its element header, or 0xFFFFFFFF (encapsulated: items up
    to the sequence delimiter, which is not part of the value). Bytes after the value are not
    read from `blocks`' later blocks.
    """
    digest = hashlib.sha512()
    reader = _Blocks(blocks, what)
    if length != UNDEFINED_LENGTH:
        reader.feed(length, digest)
        return digest.hexdigest()
    while True:
        header = reader.take(8)
        if len(header) < 8:
            raise SlideError(ReasonCode.READ_ERROR, f"{what}: PixelData has no sequence delimiter")
        group, element, item_length = struct.unpack("<HHI", header)
        if (group, element) == _SEQUENCE_DELIMITER:
            return digest.hexdigest()
        if (group, element) != _ITEM or item_length == UNDEFINED_LENGTH:
            raise SlideError(
                ReasonCode.READ_ERROR,
                f"{what}: encapsulated PixelData holds ({group:04X},{element:04X}) where an item "
                "of defined length is expected",
            )
        digest.update(header)
        reader.feed(item_length, digest)


def _value_header(head: bytes, transfer_syntax: str) -> tuple[int, int]:
    """(bytes from the PixelData tag to its value, value length) from the element's first 12."""
    explicit = transfer_syntax != pydicom.uid.ImplicitVRLittleEndian
    if explicit and head[4:6] in _LONG_VRS:
        return 12, struct.unpack("<I", head[8:12])[0]
    return 8, struct.unpack("<I", head[4:8])[0]


def _range_blocks(source: byte_ranges.ByteSource, start: int, block: int) -> Iterator[bytes]:
    """Consecutive reads of `block` bytes from `start` to the end of the object."""
    size = source.size()
    while start < size:
        data = source.read(start, min(start + block, size))
        if not data:
            return
        yield data
        start += len(data)


def sha512_from_uri(
    uri: str, block: int = BLOCK, stats: byte_ranges.IoStats | None = None
) -> tuple[str, int]:
    """(SHA-512 of the PixelData value, bytes read) of a local file or a gs:// / s3:// /
    http(s):// object: header by range reads, then the value in order, `block` bytes a read."""
    stats = stats or byte_ranges.IoStats()
    source = byte_ranges.open_source(uri, stats)
    header, at = byte_ranges.read_header_from(source)
    if at < 0:
        raise SlideError(ReasonCode.READ_ERROR, f"{uri} has no PixelData")
    syntax = str(header.file_meta.TransferSyntaxUID)
    skip, length = _value_header(source.read(at, at + 12), syntax)
    digest = sha512_of_value(_range_blocks(source, at + skip, block), length, uri)
    return digest, stats.bytes


class _PrefixSource(byte_ranges.ByteSource):
    """The first bytes of a stream as a ByteSource, for parsing its header."""

    def __init__(self, data: bytes | bytearray):
        super().__init__("stream")
        self._data = data

    def size(self) -> int:
        return len(self._data)

    def _read(self, start: int, end: int) -> bytes:
        return self._data[start:end]


def sha512_of_stream(blocks: Iterable[bytes], what: str = "instance") -> str:
    """SHA-512 of the PixelData value of a DICOM Part 10 file whose bytes `blocks` yield in
    order: the header is parsed from a prefix that grows until the PixelData element is in it
    (memory: the header, then one block)."""
    it = iter(blocks)
    prefix = bytearray()
    want = 64 * 1024
    while True:
        exhausted = False
        while len(prefix) < want:
            try:
                prefix += next(it)
            except StopIteration:
                exhausted = True
                break
        try:
            header, at = byte_ranges.read_header_from(_PrefixSource(prefix))
        except (EOFError, OSError, ValueError, struct.error):
            header, at = None, -1
        if at >= 0 and len(prefix) >= at + 12:
            break
        if exhausted or len(prefix) > _MAX_HEADER:
            raise SlideError(ReasonCode.READ_ERROR, f"{what}: no PixelData element found")
        want = 2 * max(want, len(prefix))
    skip, length = _value_header(
        bytes(prefix[at : at + 12]), str(header.file_meta.TransferSyntaxUID)
    )
    rest = bytes(memoryview(prefix)[at + skip :])
    del prefix  # only the value's first bytes stay

    def chained() -> Iterator[bytes]:
        yield rest
        yield from it

    return sha512_of_value(chained(), length, what)


def _multipart_body(chunks: Iterator[bytes], content_type: str) -> Iterator[bytes]:
    """The first part's body of a multipart/related stream (the rest, from its closing
    boundary on, follows it but is never needed: the value ends before it)."""
    if not content_type.lower().startswith("multipart/"):
        yield from chunks
        return
    head = b""
    for chunk in chunks:
        head += chunk
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            yield head[end + 4 :]
            break
        if len(head) > 64 * 1024:
            raise SlideError(ReasonCode.READ_ERROR, "multipart response without part headers")
    yield from chunks


def sha512_from_dicomweb(uri: str, auth: str = "auto", block: int = BLOCK) -> tuple[str, int]:
    """(SHA-512 of the PixelData value, bytes received) of a WADO-RS instance URL, from one
    streamed retrieve of the instance as stored (no transcoding)."""
    base, *_ = dicomweb.parse_instance_url(uri)
    headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    dicomweb.DicomWebClient(base, auth).dwi.credentials().apply(headers)
    received = 0
    with retry.http_session().get(uri, headers=headers, stream=True) as response:
        retry.raise_for_status(response, f"DICOMweb GET {uri}")

        def counted() -> Iterator[bytes]:
            nonlocal received
            for chunk in response.iter_content(chunk_size=block):
                received += len(chunk)
                yield chunk

        body = _multipart_body(counted(), response.headers.get("Content-Type", ""))
        digest = sha512_of_stream(body, uri)
    return digest, received


def pixeldata_sha512(uri: str, auth: str = "auto", block: int = BLOCK) -> tuple[str, int]:
    """(SHA-512 of the PixelData value, bytes read) of any instance location a SlideRecord
    holds: a local path, gs://, s3://, http(s):// object, or a WADO-RS instance URL."""
    if dicomweb.is_instance_url(uri):
        return sha512_from_dicomweb(uri, auth, block)
    return sha512_from_uri(uri, block)
