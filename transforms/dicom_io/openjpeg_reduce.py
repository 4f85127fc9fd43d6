"""JPEG 2000 decoded at reduced resolution by OpenJPEG's `opj_set_decoded_resolution_factor`.

No Python binding of OpenJPEG on PyPI exposes the resolution factor for an in-memory codestream
(imagecodecs' and pylibjpeg-openjpeg's decode() have no such argument, OpenCV's
IMREAD_REDUCED_* decodes whole and resizes, Pillow's `Image.reduce` does reduce but decodes
through a Python file object with the GIL held and costs about twice the CPU of imagecodecs
at full size; glymur needs a system libopenjp2 and a file). So this calls the OpenJPEG 2.5
library that the imagecodecs wheel ships (imagecodecs.libs/libopenjp2-*.so, the same library
and version imagecodecs decodes with; else Pillow's copy, else a system libopenjp2) through
ctypes: the codestream is read from memory by three small callbacks and `opj_decode` runs
without the GIL.
At full resolution it gives exactly imagecodecs' pixels (tests/test_codecs.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import os

import numpy as np

_SIZE, _OFF = ctypes.c_size_t, ctypes.c_int64
_READ = ctypes.CFUNCTYPE(_SIZE, ctypes.c_void_p, _SIZE, ctypes.c_void_p)
_SKIP = ctypes.CFUNCTYPE(_OFF, _OFF, ctypes.c_void_p)
_SEEK = ctypes.CFUNCTYPE(ctypes.c_int, _OFF, ctypes.c_void_p)
_CODEC_J2K = 0  # OPJ_CODEC_J2K: a raw codestream, as DICOM stores it
_PARAMETERS_BYTES = 1 << 16  # opj_dparameters_t is ~20 KiB in OpenJPEG 2.5


class _Buffer(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("size", _SIZE), ("pos", _SIZE)]


class _Component(ctypes.Structure):  # opj_image_comp_t (OpenJPEG 2.x)
    _fields_ = [
        *[
            (name, ctypes.c_uint32)
            for name in ("dx", "dy", "w", "h", "x0", "y0", "prec", "bpp", "sgnd")
        ],
        ("resno_decoded", ctypes.c_uint32),
        ("factor", ctypes.c_uint32),
        ("data", ctypes.POINTER(ctypes.c_int32)),
        ("alpha", ctypes.c_uint16),
    ]


class _Image(ctypes.Structure):  # opj_image_t
    _fields_ = [
        *[(name, ctypes.c_uint32) for name in ("x0", "y0", "x1", "y1", "numcomps")],
        ("color_space", ctypes.c_int),
        ("comps", ctypes.POINTER(_Component)),
        ("icc_profile_buf", ctypes.c_void_p),
        ("icc_profile_len", ctypes.c_uint32),
    ]


def _buffer(user: int) -> _Buffer:
    return ctypes.cast(user, ctypes.POINTER(_Buffer)).contents


@_READ
def _read(destination: int, n: int, user: int) -> int:
    buffer = _buffer(user)
    left = buffer.size - buffer.pos
    if left == 0:
        return _SIZE(-1).value  # end of stream
    n = min(n, left)
    ctypes.memmove(destination, buffer.data + buffer.pos, n)
    buffer.pos += n
    return n


@_SKIP
def _skip(n: int, user: int) -> int:
    buffer = _buffer(user)
    n = max(-buffer.pos, min(n, buffer.size - buffer.pos))
    buffer.pos += n
    return n


@_SEEK
def _seek(position: int, user: int) -> int:
    buffer = _buffer(user)
    if not 0 <= position <= buffer.size:
        return 0
    buffer.pos = position
    return 1


def library_path() -> str | None:
    """The libopenjp2 this module uses: imagecodecs' copy, Pillow's, or the system's."""
    for package in ("imagecodecs", "PIL"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.origin:
            continue
        site = os.path.dirname(os.path.dirname(spec.origin))
        libs = "pillow.libs" if package == "PIL" else "imagecodecs.libs"
        found = sorted(glob.glob(os.path.join(site, libs, "libopenjp2*.so*")))
        if found:
            return found[0]
    return ctypes.util.find_library("openjp2")


@functools.cache
def _library() -> ctypes.CDLL | None:
    path = library_path()
    if path is None:
        return None
    lib = ctypes.CDLL(path)  # CDLL: every call releases the GIL
    p, i = ctypes.c_void_p, ctypes.c_int
    image_p = ctypes.POINTER(_Image)
    signatures = {
        "opj_set_default_decoder_parameters": (None, [p]),
        "opj_create_decompress": (p, [i]),
        "opj_setup_decoder": (i, [p, p]),
        "opj_stream_create": (p, [_SIZE, i]),
        "opj_stream_set_read_function": (None, [p, _READ]),
        "opj_stream_set_skip_function": (None, [p, _SKIP]),
        "opj_stream_set_seek_function": (None, [p, _SEEK]),
        "opj_stream_set_user_data": (None, [p, p, p]),
        "opj_stream_set_user_data_length": (None, [p, ctypes.c_uint64]),
        "opj_read_header": (i, [p, p, ctypes.POINTER(image_p)]),
        "opj_set_decoded_resolution_factor": (i, [p, ctypes.c_uint32]),
        "opj_decode": (i, [p, p, image_p]),
        "opj_end_decompress": (i, [p, p]),
        "opj_image_destroy": (None, [image_p]),
        "opj_stream_destroy": (None, [p]),
        "opj_destroy_codec": (None, [p]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def available() -> bool:
    return _library() is not None


def decode(data: bytes, reduce: int = 0) -> np.ndarray:
    """uint8 [h, w, components] of a JPEG 2000 codestream, each side divided by 2**reduce
    (rounded up) without decoding the `reduce` finest wavelet levels. ValueError if the bytes
    do not decode, RuntimeError if no libopenjp2 was found."""
    lib = _library()
    if lib is None:
        raise RuntimeError("no libopenjp2 found (imagecodecs, Pillow or the system)")
    parameters = ctypes.create_string_buffer(_PARAMETERS_BYTES)
    lib.opj_set_default_decoder_parameters(parameters)
    source = ctypes.create_string_buffer(bytes(data), len(data))
    buffer = _Buffer(ctypes.addressof(source), len(data), 0)
    codec = lib.opj_create_decompress(_CODEC_J2K)
    stream = lib.opj_stream_create(max(len(data), 1), 1)
    image = ctypes.POINTER(_Image)()
    try:
        lib.opj_stream_set_read_function(stream, _read)
        lib.opj_stream_set_skip_function(stream, _skip)
        lib.opj_stream_set_seek_function(stream, _seek)
        lib.opj_stream_set_user_data(stream, ctypes.addressof(buffer), None)
        lib.opj_stream_set_user_data_length(stream, len(data))
        if not lib.opj_setup_decoder(codec, parameters):
            raise ValueError("OpenJPEG refused the decoder parameters")
        if not lib.opj_read_header(stream, codec, ctypes.byref(image)):
            raise ValueError("not a JPEG 2000 codestream")
        if reduce and not lib.opj_set_decoded_resolution_factor(codec, reduce):
            raise ValueError(f"the codestream has fewer than {reduce} wavelet levels")
        if not lib.opj_decode(codec, stream, image) or not lib.opj_end_decompress(codec, stream):
            raise ValueError("the codestream does not decode")
        decoded = image.contents
        planes = []
        for k in range(decoded.numcomps):
            component = decoded.comps[k]
            if component.prec > 8 or component.sgnd or not component.data:
                raise ValueError(f"component {k}: {component.prec} bits, signed {component.sgnd}")
            planes.append(np.ctypeslib.as_array(component.data, (component.h, component.w)))
        if len({plane.shape for plane in planes}) != 1:
            raise ValueError("subsampled components")
        return np.stack(planes, axis=-1).astype(np.uint8)
    finally:
        if image:
            lib.opj_image_destroy(image)
        lib.opj_stream_destroy(stream)
        lib.opj_destroy_codec(codec)
