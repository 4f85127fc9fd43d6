"""Deterministic synthetic sample slides as valid DICOM VL Whole Slide Microscopy pyramids.

What it is for: demos, smoke tests and CI runs of the embedding pipeline without network
access or real patient data. Each sample is a small multi-resolution pyramid (one DICOM file per
level, JPEG baseline frames of 256 x 256, TILED_FULL) that ez-wsi-dicomweb's ``LocalDicomSlide``
and pydicom read like a scanner's output.

The pixels are NOT real tissue: they are procedurally generated, H&E-like pink/purple regions
(nucleus-like dark blobs, fibre-like streaks, a few region "types" with different textures) on a
near-white background. They only exist to give the tissue mask, the patch grid and the embedding
model something plausible and varied to work on; they carry no biological meaning.

How the pixels are made:

* Everything is a function of the physical position on the slide (mm from the top-left corner of
  the pixel matrix), so every pyramid level shows tissue in the same places (boundaries agree
  to well under a um, up to each level's pixel size). Low-resolution levels are rendered by the
  same function at their own pixel spacing, never by downsampling a full-resolution image;
  generation goes frame by frame, so no level is ever held in memory as raw pixels.
* A coarse lattice (16 um) of smooth fields (tissue field, region-type logits, stain
  intensity, background shading) is made once per sample from ``np.random.default_rng(seed)``:
  a few irregular tissue islands (elliptical blobs distorted by low-frequency noise) whose
  threshold gives a fixed tissue fraction. The lattice is evaluated with cubic B-splines on a
  grid of points every few um that all frames of a level share, and linearly interpolated.
  Tissue pixels have HSV value max(R, G, B) <= 188 + a little noise (and > 0); background is
  near-white (~236-244) with slight noise.
* Cell-scale texture (nuclei of two sizes, fibres, granularity) comes from value noise on
  hashed lattices, so it is seamless across frames; it fades to its mean opacity where a
  level's pixels are too coarse to resolve it. Textures are rendered at no finer than
  0.5 um/px and interpolated onto finer (40x) levels. Per-pixel noise is seeded from
  (seed, level, frame index).

Output is byte-for-byte deterministic: UIDs come from ``generate_uid(entropy_srcs=...)``,
dates are fixed, and the JPEG encoder (OpenCV, 4:2:2 chroma subsampling to match
``YBR_FULL_422``) is deterministic.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from transforms.dicom_io.frames import FrameGrid

__all__ = [
    "SAMPLES",
    "SampleSpec",
    "sample_uids",
    "write_sample_slide",
    "write_samples",
    "write_slide",
]

VL_WSI_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.77.1.6"
FRAME_SIZE = 256
JPEG_QUALITY = 90


@dataclass(frozen=True)
class SampleSpec:
    """One synthetic slide: geometry of the finest level, pyramid downsamples, random seed."""

    name: str  # e.g. "small-40x"
    native_spacing_mm: float  # pixel spacing of the finest level, mm/px
    width: int  # TotalPixelMatrixColumns of the finest level
    height: int  # TotalPixelMatrixRows of the finest level
    level_downsamples: tuple[int, ...]  # downsample factor of every level vs the finest, first 1
    seed: int

    def __post_init__(self) -> None:
        ds = self.level_downsamples
        if not ds or ds[0] != 1 or any(b <= a for a, b in itertools.pairwise(ds)):
            raise ValueError(f"level_downsamples must start at 1 and increase: {ds}")
        if self.width <= 0 or self.height <= 0 or self.native_spacing_mm <= 0:
            raise ValueError("width, height and native_spacing_mm must be positive")

    def level_size(self, level: int) -> tuple[int, int]:
        """(width, height) in pixels of pyramid level ``level`` (0 = finest)."""
        ds = self.level_downsamples[level]
        return -(-self.width // ds), -(-self.height // ds)

    def level_spacing_mm(self, level: int) -> float:
        """Pixel spacing (mm/px, same for rows and columns) of pyramid level ``level``."""
        return self.native_spacing_mm * self.level_downsamples[level]


# Sizes are divisible by every downsample factor, and their 20x sizes are not multiples of 224
# (half a patch over), so a patch grid does not change when a reader's size computation is off
# by a pixel (ez-wsi's resized levels can be: ImagedVolumeWidth/Height are float32).
SAMPLES: dict[str, SampleSpec] = {
    # 40x (0.25 um/px) with no 20x level: the pipeline has to read 40x and downsample. Levels at
    # 0.25, 4 and 8 um/px. At 20x it is 7280 x 5040 px: a 32 x 22 grid of 224-px patches.
    "small-40x": SampleSpec(
        name="small-40x",
        native_spacing_mm=0.00025,
        width=14560,
        height=10080,
        level_downsamples=(1, 16, 32),
        seed=40,
    ),
    # 20x (0.5 um/px), levels at 0.5, 2, 4 and 8 um/px: a 100 x 75 grid of 224-px patches.
    "medium-20x": SampleSpec(
        name="medium-20x",
        native_spacing_mm=0.0005,
        width=22512,
        height=16912,
        level_downsamples=(1, 4, 8, 16),
        seed=20,
    ),
}


@dataclass(frozen=True)
class _Layout:
    """Where the tissue goes: islands on a jittered grid; the tissue field's threshold is set
    so that `fraction` of the slide's area is tissue."""

    grid: tuple[int, int]  # (columns, rows) of island cells
    islands: int  # islands in randomly chosen cells (<= columns * rows)
    fraction: float


_LAYOUTS = {
    "small-40x": _Layout(grid=(3, 2), islands=5, fraction=0.33),
    "medium-20x": _Layout(grid=(3, 2), islands=6, fraction=0.36),
}
_DEFAULT_LAYOUT = _Layout(grid=(2, 2), islands=3, fraction=0.35)

# ---------------------------------------------------------------------------------------------
# Procedural image model
# ---------------------------------------------------------------------------------------------

_LATTICE_MM = 0.016  # node spacing of the coarse field lattice
_PAD = 3  # lattice nodes beyond the slide on every side
_EDGE_WIDTH = 0.002  # tissue field units (~mm) over which tissue fades into background
_TISSUE_V_MAX = 188.0  # cap on max(R, G, B) of tissue colours (mask threshold: 204)
_BACKGROUND_RGB = (239.0, 238.0, 241.0)
_PAD_RGB = np.array([240, 240, 240], np.uint8)  # outside the total pixel matrix
_SMOOTH_STEP_UM = 8.0  # smooth fields are sampled at most this far apart, then interpolated

# Field lattice channels: the tissue field, then smooth fields that only steer colours.
_CH_TISSUE = 0
_N_REGIONS = 3
_S_REGION0, _S_INTENSITY, _S_BACKGROUND = 0, 3, 4  # index among smooth ones
_N_SMOOTH = 5

# Region types, in the order of the region logit channels:
#   0 "epithelial": pinkish-purple cytoplasm, large nuclei (cell 7 um), medium density;
#   1 "stroma": pink, dark fibre streaks, sparse small nuclei;
#   2 "lymphoid": purple, small dense dark nuclei (cell 4 um).
# Regions blend smoothly into each other; every colour has max(R, G, B) <= _TISSUE_V_MAX.
_STROMA = 1
_CYTOPLASM = np.array([[182, 120, 168], [190, 118, 150], [165, 108, 165]], np.float32)
_LARGE_NUCLEUS_RGB = (80.0, 50.0, 128.0)
_SMALL_NUCLEUS_RGB = (60.0, 37.0, 106.0)
_FIBRE_RGB = (170.0, 82.0, 128.0)
_LARGE_NUCLEI_COVERAGE = np.array([0.30, 0.0, 0.0], np.float32)  # per region
_SMALL_NUCLEI_COVERAGE = np.array([0.0, 0.07, 0.48], np.float32)
_LARGE_NUCLEUS_CELL_UM = 7.0
_SMALL_NUCLEUS_CELL_UM = 4.0
_NUCLEUS_EDGE = 0.03  # noise units over which a nucleus fades out (soft boundary)
_FIBRE_CELL_UM = 6.0  # fibres are thin contour lines of value noise with this cell size
_FIBRE_SHARPNESS = 12.0  # larger: thinner fibres
_FIBRE_MEAN = 0.215  # mean fibre opacity (used where fibres are not resolved)
_GRAIN_CELL_UM = 2.0  # granular cytoplasm / chromatin texture
_GRAIN_DEPTH = 0.25  # grain darkens by up to this fraction
_NOISE_SAMPLES_PER_CELL = 3.0  # value noise is evaluated at least this densely, interpolated
_GRAIN_SAMPLES_PER_CELL = 2.0
_TISSUE_SAMPLE_UM = 2.0  # the tissue field is evaluated at most this far apart, interpolated
_REGION_SHARPNESS = 4.0
# Textures are rendered at no finer than this pixel spacing (about the optical resolution of a
# 40x scan) and interpolated onto finer levels.
_TEXTURE_SPACING_UM = 0.5


def _ramp(x: np.ndarray) -> np.ndarray:
    """x clipped to [0, 1], in place (np.clip is much faster than np.minimum/np.maximum)."""
    return np.clip(x, 0.0, 1.0, out=x)


@dataclass(frozen=True)
class _Taps:
    """Cubic B-spline weights of a row of positions on a lattice (node k at position k)."""

    index: np.ndarray  # (4, n) index of the 4 nodes each position depends on, relative to k0
    weight: np.ndarray  # (4, n) float32 weights of those nodes
    k0: int  # first lattice node touched
    count: int  # number of lattice nodes touched


@functools.lru_cache(maxsize=8192)
def _taps(start: float, step: float, n: int) -> _Taps:
    """Taps of the n positions start + i * step (in lattice units)."""
    u = start + step * np.arange(n)
    i = np.floor(u)
    t = u - i
    t2 = t * t
    t3 = t2 * t
    weight = np.stack(
        [
            (1.0 - t) ** 3 / 6.0,
            (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0,
            (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0,
            t3 / 6.0,
        ]
    ).astype(np.float32)
    k0 = int(i[0]) - 1
    index = (i.astype(np.intp) - 1 - k0)[None, :] + np.arange(4)[:, None]
    index.flags.writeable = False
    weight.flags.writeable = False
    return _Taps(index, weight, k0, int(i[-1]) + 3 - k0)


def _interpolate(lattice: np.ndarray, ty: _Taps, tx: _Taps) -> np.ndarray:
    """(..., h, w) B-spline interpolation of lattice (..., ty.count, tx.count) at the taps.

    Separable, 4 taps per axis, with numpy gathers: no matrix products, whose BLAS thread
    pools (numpy's and OpenCV's) would keep a second core spinning.
    """
    ix, wx = tx.index, tx.weight
    cols = np.take(lattice, ix[0], axis=-1)
    cols *= wx[0]
    for k in range(1, 4):
        cols += np.take(lattice, ix[k], axis=-1) * wx[k]
    iy, wy = ty.index, ty.weight[:, :, None]
    out = np.take(cols, iy[0], axis=-2)
    out *= wy[0]
    tmp = np.empty_like(out)
    for k in range(1, 4):
        np.take(cols, iy[k], axis=-2, out=tmp)
        tmp *= wy[k]
        out += tmp
    return out


_MASK64 = (1 << 64) - 1


def _hash_uniform(key: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) values of lattice nodes (rows x cols), a pure function of key and index."""
    r = rows.astype(np.int64).astype(np.uint64)[:, None]
    c = cols.astype(np.int64).astype(np.uint64)[None, :]
    x = r * np.uint64(0x9E3779B97F4A7C15) ^ c * np.uint64(0xC2B2AE3D27D4EB4F)
    x += np.uint64((key * 0x165667B19E3779F9) & _MASK64)
    # splitmix64 finaliser
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _sample_step(spacing_um: float, sample_um: float, max_step: int = 16) -> int:
    """Largest power of two pixel step (<= max_step) whose length is at most sample_um."""
    step = 1
    while 2 * step <= max_step and 2 * step * spacing_um <= sample_um:
        step *= 2
    return step


def _frame_noise(
    key: int, frame: _Frame, cell_um: float, samples_per_cell: float = _NOISE_SAMPLES_PER_CELL
) -> np.ndarray:
    """(h, w) value noise of the frame's pixels, evaluated on a coarser grid where the cells
    are large enough and linearly interpolated."""
    step = _sample_step(frame.spacing_um, cell_um / samples_per_cell, 8)
    values = _value_noise(key, *frame.taps(cell_um, cell_um, step))
    return values if step == 1 else _upsample(values[None], step, frame)[0]


def _value_noise(key: int, ty: _Taps, tx: _Taps) -> np.ndarray:
    """Smooth value noise in about [0.1, 0.9]: B-spline of hashed uniform lattice values."""
    rows = np.arange(ty.k0, ty.k0 + ty.count)
    cols = np.arange(tx.k0, tx.k0 + tx.count)
    return _interpolate(_hash_uniform(key, rows, cols), ty, tx)


@functools.cache
def _noise_quantiles() -> tuple[np.ndarray, np.ndarray]:
    """Quantile table of the value noise (to find a threshold that gives a wanted coverage)."""
    taps = _taps(0.5 / 8.0, 1.0 / 8.0, 96 * 8)
    probs = np.linspace(0.0, 1.0, 201)
    values = _value_noise(0x5EED, taps, taps).ravel()
    return probs, np.quantile(values, probs).astype(np.float32)


def _detail(cell_um: float, spacing_um: float) -> float:
    """1 where a texture of this cell size is resolved by the pixel spacing, 0 where it is not."""
    return min(1.0, max(0.0, cell_um / spacing_um - 1.0))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_mm: float) -> np.ndarray:
    white = rng.standard_normal(shape).astype(np.float32)
    out = cv2.GaussianBlur(white, (0, 0), sigma_mm / _LATTICE_MM, borderType=cv2.BORDER_REFLECT)
    out -= out.mean()
    return out / max(float(out.std()), 1e-6)


@functools.cache
def _fields(spec: SampleSpec) -> np.ndarray:
    """The slide's coarse field lattice (1 + _N_SMOOTH, rows, cols), made once from the seed.

    Node (r, c) sits at ((c - _PAD) * _LATTICE_MM, (r - _PAD) * _LATTICE_MM) mm. Channel
    _CH_TISSUE is > 0 inside tissue; the tissue boundary is where it crosses 0.
    """
    rng = np.random.default_rng(spec.seed)
    w_mm = spec.width * spec.native_spacing_mm
    h_mm = spec.height * spec.native_spacing_mm
    nx = math.ceil(w_mm / _LATTICE_MM) + 2 * _PAD + 1
    ny = math.ceil(h_mm / _LATTICE_MM) + 2 * _PAD + 1
    x = ((np.arange(nx) - _PAD) * _LATTICE_MM)[None, :]
    y = ((np.arange(ny) - _PAD) * _LATTICE_MM)[:, None]
    layout = _LAYOUTS.get(spec.name, _DEFAULT_LAYOUT)

    # Elliptical islands on a jittered grid, distorted by low-frequency noise. The field is
    # about (island radius - distance from the island's centre) in mm, so its gradient at the
    # boundary is ~1 per mm and _EDGE_WIDTH is about the width of the tissue's soft edge in mm.
    cols, rows = layout.grid
    cell_w, cell_h = w_mm / cols, h_mm / rows
    radius = 0.36 * min(cell_w, cell_h)
    cells = rng.permutation(cols * rows)[: layout.islands]
    islands = np.full((ny, nx), -radius, np.float32)
    for cell in cells:
        cx = (cell % cols + 0.5 + rng.uniform(-0.1, 0.1)) * cell_w
        cy = (cell // cols + 0.5 + rng.uniform(-0.1, 0.1)) * cell_h
        r = radius * rng.uniform(0.8, 1.1)
        elongation = rng.uniform(1.0, 1.35)
        theta = rng.uniform(0.0, math.pi)
        dx, dy = x - cx, y - cy
        a = (dx * math.cos(theta) + dy * math.sin(theta)) / (r * elongation)
        b = (-dx * math.sin(theta) + dy * math.cos(theta)) * elongation / r
        island = radius * (1.0 - np.sqrt(a * a + b * b))
        islands = np.maximum(islands, island.astype(np.float32))
    tissue = islands + radius * (
        0.22 * _smooth_noise(rng, (ny, nx), 0.2 * radius)
        + 0.06 * _smooth_noise(rng, (ny, nx), 0.04)
    )
    # Keep a margin of clean background along the slide's borders.
    margin = 0.06 * min(w_mm, h_mm)
    edge = np.minimum(np.minimum(x, w_mm - x), np.minimum(y, h_mm - y))
    tissue -= 2.0 * radius * np.clip((margin - edge) / margin, 0.0, None)
    inside = np.broadcast_to((x >= 0) & (x <= w_mm) & (y >= 0) & (y <= h_mm), tissue.shape)
    threshold = float(np.quantile(tissue[inside], 1.0 - layout.fraction))

    lattice = np.empty((1 + _N_SMOOTH, ny, nx), np.float32)
    lattice[_CH_TISSUE] = tissue - threshold
    smooth = lattice[1:]
    for k in range(_N_REGIONS):
        smooth[_S_REGION0 + k] = _smooth_noise(rng, (ny, nx), 0.18)
    smooth[_S_INTENSITY] = _smooth_noise(rng, (ny, nx), 0.3)
    smooth[_S_BACKGROUND] = _smooth_noise(rng, (ny, nx), 0.5)
    lattice.flags.writeable = False
    return lattice


@dataclass(frozen=True)
class _Frame:
    """Pixel geometry of one frame (or the part of it inside the total pixel matrix)."""

    x0: int
    y0: int
    w: int
    h: int
    spacing_um: float

    def taps(
        self, cell_x_um: float, cell_y_um: float, step: int = 1, offset: float = 0.0
    ) -> tuple[_Taps, _Taps]:
        """(row taps, column taps) on a lattice with the given cell size whose node k is at
        (k - offset) cells from the slide's corner: of the pixel centres (step 1), or of every
        step-th pixel from one step before the frame to one step after it, i.e. of the pixels
        step * k + (step - 1) / 2 for k = -1 .. ceil(size / step) (see _upsample).
        """
        s = self.spacing_um
        if step == 1:
            first, ny, nx = 0.5, self.h, self.w
        else:
            first, ny, nx = -step / 2.0, -(-self.h // step) + 2, -(-self.w // step) + 2
        ty = _taps((self.y0 + first) * s / cell_y_um + offset, step * s / cell_y_um, ny)
        tx = _taps((self.x0 + first) * s / cell_x_um + offset, step * s / cell_x_um, nx)
        return ty, tx

    def field_taps(self, step: int = 1) -> tuple[_Taps, _Taps]:
        """Taps on the field lattice (see taps)."""
        g_um = _LATTICE_MM * 1000.0
        return self.taps(g_um, g_um, step, _PAD)


def _crop(lattice: np.ndarray, ty: _Taps, tx: _Taps) -> np.ndarray:
    return lattice[..., ty.k0 : ty.k0 + ty.count, tx.k0 : tx.k0 + tx.count]


def _tissue_field(
    spec: SampleSpec, frame: _Frame, skip_below: float | None = None
) -> np.ndarray | None:
    """(h, w) tissue field at the pixel centres: > 0 inside tissue, boundary at 0.

    It is evaluated every few um (the same points for all frames of a level) and linearly
    interpolated in between, which moves the boundary by far less than a um. Returns None if
    skip_below is given and the field is certainly below it in the whole frame (a B-spline is
    a convex combination of the lattice values it touches).
    """
    step = _sample_step(frame.spacing_um, _TISSUE_SAMPLE_UM)
    ty, tx = frame.field_taps(step)
    lattice = _crop(_fields(spec)[_CH_TISSUE], ty, tx)
    if skip_below is not None and float(lattice.max()) <= skip_below:
        return None
    values = _interpolate(lattice, ty, tx)
    return values if step == 1 else _upsample(values[None], step, frame)[0]


def _upsample(coarse: np.ndarray, step: int, frame: _Frame) -> list[np.ndarray]:
    """(h, w) planes from (n, ny, nx) values at the nodes of frame.taps(..., step).

    Node k sits at pixel step * k + (step - 1) / 2 for k = -1, 0, ...: exactly cv2.resize's
    mapping for the scale factor step, shifted by one node. Frames share the nodes (step
    divides the frame size), so the result is seamless.
    """
    if step == 1:
        return list(coarse)
    # All planes in one single-channel resize, stacked vertically (OpenCV's resize is slow for
    # more than 4 channels): the crop only uses rows that interpolate within their own plane.
    n, ny, nx = coarse.shape
    fine = cv2.resize(
        coarse.reshape(n * ny, nx), None, fx=step, fy=step, interpolation=cv2.INTER_LINEAR
    ).reshape(n, ny * step, nx * step)
    return list(np.ascontiguousarray(fine[:, step : step + frame.h, step : step + frame.w]))


def _background_shade(spec: SampleSpec, frame: _Frame) -> np.ndarray:
    """(h, w) slow grey-level variation of the background."""
    step = _sample_step(frame.spacing_um, _SMOOTH_STEP_UM)
    ty, tx = frame.field_taps(step)
    lattice = _fields(spec)[1 + _S_BACKGROUND]
    coarse = _interpolate(_crop(lattice, ty, tx), ty, tx) * np.float32(1.5)
    return _upsample(coarse[None], step, frame)[0]


# Colour fields: smooth per-pixel parameters of the tissue texture, derived from the smooth
# lattice channels on a coarse grid and interpolated.
_C_BASE, _C_BACKGROUND, _C_FIBRE_WEIGHT = 0, 3, 4
_C_LARGE_THRESHOLD, _C_SMALL_THRESHOLD, _C_LARGE_COVERAGE, _C_SMALL_COVERAGE = 5, 6, 7, 8
_N_COLOUR_FIELDS = 9


def _colour_fields(spec: SampleSpec, frame: _Frame, coverage: bool) -> list[np.ndarray]:
    """The (h, w) colour field planes of a frame, indexed by the _C_* constants (without the
    coverage planes unless `coverage`)."""
    step = _sample_step(frame.spacing_um, _SMOOTH_STEP_UM)
    ty, tx = frame.field_taps(step)
    smooth = _interpolate(_crop(_fields(spec)[1:], ty, tx), ty, tx)
    logits = _REGION_SHARPNESS * smooth[_S_REGION0 : _S_REGION0 + _N_REGIONS]
    weights = np.exp(logits - logits.max(axis=0))
    weights /= weights.sum(axis=0)
    out = np.empty((_N_COLOUR_FIELDS, *smooth.shape[1:]), np.float32)
    # cytoplasm colour: region mix times stain intensity, capped at max(R, G, B) <= cap
    # (explicit sums, not tensordot: see _interpolate about BLAS)
    base = sum(_CYTOPLASM[k][:, None, None] * weights[k] for k in range(_N_REGIONS))
    base *= 1.0 + 0.07 * np.clip(smooth[_S_INTENSITY], -2.0, 2.0)
    base *= np.minimum(1.0, _TISSUE_V_MAX / base.max(axis=0))
    out[_C_BASE : _C_BASE + 3] = base
    out[_C_BACKGROUND] = 1.5 * smooth[_S_BACKGROUND]
    out[_C_FIBRE_WEIGHT] = weights[_STROMA]
    probs, quantiles = _noise_quantiles()
    large = sum(_LARGE_NUCLEI_COVERAGE[k] * weights[k] for k in range(_N_REGIONS))
    small = sum(_SMALL_NUCLEI_COVERAGE[k] * weights[k] for k in range(_N_REGIONS))
    out[_C_LARGE_COVERAGE] = large
    out[_C_SMALL_COVERAGE] = small
    out[_C_LARGE_THRESHOLD] = np.interp(1.0 - large, probs, quantiles)
    out[_C_SMALL_THRESHOLD] = np.interp(1.0 - small, probs, quantiles)
    if not coverage:
        out = out[:_C_LARGE_COVERAGE]  # the coverage planes come last
    return _upsample(out, step, frame)


def _nuclei(
    key: int, frame: _Frame, cell_um: float, fields: list[np.ndarray], threshold: int, coverage: int
) -> np.ndarray:
    """(h, w) nucleus opacity: blobs of value noise above the threshold field, or the coverage
    field (the mean opacity) where the pixels are too coarse to resolve them."""
    detail = _detail(cell_um, frame.spacing_um)
    if detail <= 0:
        return fields[coverage]
    noise = _frame_noise(key, frame, cell_um)
    noise -= fields[threshold]
    noise *= np.float32(1.0 / _NUCLEUS_EDGE)
    noise += np.float32(0.5)
    nuclei = _ramp(noise)
    if detail < 1:
        nuclei -= fields[coverage]
        nuclei *= np.float32(detail)
        nuclei += fields[coverage]
    return nuclei


def _render_tissue(spec: SampleSpec, frame: _Frame) -> tuple[list[np.ndarray], np.ndarray]:
    """(R, G, B planes of the tissue colour, background shade), each (h, w) float32."""
    key = spec.seed * 16
    coverage = min(_LARGE_NUCLEUS_CELL_UM, _SMALL_NUCLEUS_CELL_UM) < 2.0 * frame.spacing_um
    fields = _colour_fields(spec, frame, coverage)

    # Grain darkens the cytoplasm; its mean is the same at every level.
    detail = _detail(_GRAIN_CELL_UM, frame.spacing_um)
    if detail > 0:
        shade = _frame_noise(key + 1, frame, _GRAIN_CELL_UM, _GRAIN_SAMPLES_PER_CELL)
        shade *= np.float32(-_GRAIN_DEPTH * detail)
        shade += np.float32(1.0 - _GRAIN_DEPTH * 0.5 * (1.0 - detail))
    else:
        shade = np.float32(1.0 - _GRAIN_DEPTH * 0.5)

    detail = _detail(_FIBRE_CELL_UM / 3.0, frame.spacing_um)
    fibres = fields[_C_FIBRE_WEIGHT]
    if detail > 0:
        # wavy streaks where the noise is close to 0.5 (its contour lines)
        noise = _frame_noise(key + 2, frame, _FIBRE_CELL_UM)
        noise -= np.float32(0.5)
        streaks = _ramp(np.float32(1.0) - np.abs(noise) * np.float32(_FIBRE_SHARPNESS))
        if detail < 1:
            streaks -= np.float32(_FIBRE_MEAN)
            streaks *= np.float32(detail)
            streaks += np.float32(_FIBRE_MEAN)
        fibres = fibres * streaks
    else:
        fibres = fibres * np.float32(_FIBRE_MEAN)

    large = _nuclei(
        key + 4, frame, _LARGE_NUCLEUS_CELL_UM, fields, _C_LARGE_THRESHOLD, _C_LARGE_COVERAGE
    )
    small = _nuclei(
        key + 5, frame, _SMALL_NUCLEUS_CELL_UM, fields, _C_SMALL_THRESHOLD, _C_SMALL_COVERAGE
    )
    # Layers over the cytoplasm: fibres, then nuclei ("over" compositing keeps every colour a
    # convex combination of colours with max(R, G, B) <= the cap).
    planes = []
    for c in range(3):
        colour = fields[_C_BASE + c] * shade
        for opacity, rgb in (
            (fibres, _FIBRE_RGB),
            (large, _LARGE_NUCLEUS_RGB),
            (small, _SMALL_NUCLEUS_RGB),
        ):
            colour += opacity * (np.float32(rgb[c]) - colour)
        planes.append(colour)
    return planes, fields[_C_BACKGROUND]


def _frame_geometry(spec: SampleSpec, level: int, frame_index: int) -> _Frame:
    width, height = spec.level_size(level)
    row, col = FrameGrid(width, height, FRAME_SIZE, FRAME_SIZE).row_col(frame_index + 1)
    x0, y0 = col * FRAME_SIZE, row * FRAME_SIZE
    return _Frame(
        x0=x0,
        y0=y0,
        w=min(FRAME_SIZE, width - x0),
        h=min(FRAME_SIZE, height - y0),
        spacing_um=spec.level_spacing_mm(level) * 1000.0,
    )


def _render_frame(spec: SampleSpec, level: int, frame_index: int) -> np.ndarray:
    """RGB uint8 (FRAME_SIZE, FRAME_SIZE, 3) pixels of one frame, exactly as they get encoded."""
    frame = _frame_geometry(spec, level, frame_index)
    rng = np.random.default_rng([spec.seed, level, frame_index])
    # Per-pixel noise: uniform, zero mean, standard deviation 1.
    noise = rng.integers(0, 256, (frame.h, frame.w), dtype=np.uint8).astype(np.float32)
    noise -= np.float32(127.5)
    noise *= np.float32(math.sqrt(12.0) / 256.0)

    alpha = _tissue_field(spec, frame, skip_below=-0.5 * _EDGE_WIDTH)
    if alpha is not None:
        alpha *= np.float32(1.0 / _EDGE_WIDTH)
        alpha += np.float32(0.5)
        alpha = _ramp(alpha)
        if float(alpha.max()) <= 0.0:
            alpha = None
    if alpha is None:
        noise *= np.float32(1.2)
        noise += _background_shade(spec, frame)
        planes = [noise + np.float32(c) for c in _BACKGROUND_RGB]
    else:
        factor = 1
        while 2 * factor * frame.spacing_um <= _TEXTURE_SPACING_UM:
            factor *= 2
        if factor == 1:
            tissue, shade = _render_tissue(spec, frame)
        else:
            # Render on a grid `factor` times coarser, with a margin of one coarse pixel, and
            # interpolate: coarse pixel j is centred between fine pixels factor * j and
            # factor * (j + 1) - 1, which is cv2.resize's mapping for the scale `factor`.
            coarse = _Frame(
                x0=frame.x0 // factor - 1,
                y0=frame.y0 // factor - 1,
                w=-(-frame.w // factor) + 2,
                h=-(-frame.h // factor) + 2,
                spacing_um=frame.spacing_um * factor,
            )
            coarse_tissue, coarse_shade = _render_tissue(spec, coarse)
            *tissue, shade = [
                np.ascontiguousarray(
                    cv2.resize(plane, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)[
                        factor : factor + frame.h, factor : factor + frame.w
                    ]
                )
                for plane in (*coarse_tissue, coarse_shade)
            ]
        planes = []
        if float(alpha.min()) >= 1.0:  # all tissue
            noise *= np.float32(3.2)
            for plane in tissue:
                plane += noise
                planes.append(plane)
        else:
            noise *= np.float32(1.2) + np.float32(2.0) * alpha
            for c, plane in enumerate(tissue):
                background = shade + np.float32(_BACKGROUND_RGB[c])
                plane -= background
                plane *= alpha
                plane += background
                plane += noise
                planes.append(plane)
    # convertScaleAbs rounds and saturates to uint8 (values are never negative here).
    rgb = cv2.merge([cv2.convertScaleAbs(p) for p in planes])
    if frame.h == FRAME_SIZE and frame.w == FRAME_SIZE:
        return rgb
    out = np.empty((FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
    out[...] = _PAD_RGB
    out[: frame.h, : frame.w] = rgb
    return out


def _render_region(spec: SampleSpec, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """RGB uint8 (h, w, 3) of a region of a level, exactly as generated (before JPEG)."""
    grid = FrameGrid(*spec.level_size(level), FRAME_SIZE, FRAME_SIZE)
    out = np.empty((h, w, 3), np.uint8)
    for fy in grid.rows(y, h):
        for fx in grid.columns(x, w):
            frame = _render_frame(spec, level, grid.number(fy, fx) - 1)
            ox, oy = fx * FRAME_SIZE, fy * FRAME_SIZE
            sx0, sy0 = max(x, ox), max(y, oy)
            sx1, sy1 = min(x + w, ox + FRAME_SIZE), min(y + h, oy + FRAME_SIZE)
            out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = frame[
                sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox
            ]
    return out


def _tissue_mask(spec: SampleSpec, level: int) -> np.ndarray:
    """(height, width) bool: where the procedural model puts tissue at this level (field > 0)."""
    width, height = spec.level_size(level)
    frame = _Frame(0, 0, width, height, spec.level_spacing_mm(level) * 1000.0)
    return _tissue_field(spec, frame) > 0


def _encode_frame(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg",
        cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
        [
            cv2.IMWRITE_JPEG_QUALITY,
            JPEG_QUALITY,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
        ],
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------

_UID_ENTROPY = "pathembed-sample-slide"
_DATE = "20240101"
_TIME = "120000"


def _uid(name: str, *parts: object) -> str:
    return generate_uid(entropy_srcs=[_UID_ENTROPY, name, *(str(p) for p in parts)])


def sample_uids(name: str) -> tuple[str, str]:
    """(StudyInstanceUID, SeriesInstanceUID) of sample ``name``; the same on every run."""
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; known: {sorted(SAMPLES)}")
    return _uid(name, "study"), _uid(name, "series")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _ds(value: float) -> str:
    """A decimal string (DS) for value."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.8e}"
    return text


def _level_dataset(spec: SampleSpec, level: int, n_frames: int, compressed_bytes: int) -> Dataset:
    """Every attribute of the level's instance except the pixel data."""
    study_uid, series_uid = _uid(spec.name, "study"), _uid(spec.name, "series")
    sop_uid = _uid(spec.name, "instance", level)
    width, height = spec.level_size(level)
    spacing = spec.level_spacing_mm(level)
    finest = level == 0
    image_type = (
        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        if finest
        else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    )
    ratio = n_frames * FRAME_SIZE * FRAME_SIZE * 3 / max(compressed_bytes, 1)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VL_WSI_SOP_CLASS_UID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = image_type
    ds.SOPClassUID = VL_WSI_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = _DATE
    ds.SeriesDate = _DATE
    ds.ContentDate = _DATE
    ds.AcquisitionDateTime = _DATE + _TIME
    ds.StudyTime = _TIME
    ds.SeriesTime = _TIME
    ds.ContentTime = _TIME
    ds.AccessionNumber = f"PE-{spec.name}"[:16]
    ds.Modality = "SM"
    ds.Manufacturer = "pathembed sample"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "pathembed synthetic sample slide"
    ds.SeriesDescription = f"synthetic sample {spec.name} (not real tissue)"
    ds.ManufacturerModelName = "synthetic"
    ds.VolumetricProperties = "VOLUME"
    ds.PatientName = "Sample^Synthetic"
    ds.PatientID = f"PATHEMBED-{spec.name}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "pathembed sample_slides 1"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = level + 1
    ds.FrameOfReferenceUID = _uid(spec.name, "frame-of-reference")
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.DimensionOrganizationType = "TILED_FULL"
    dim_org_uid = _uid(spec.name, "dimension-organization", level)
    dim_org = Dataset()
    dim_org.DimensionOrganizationUID = dim_org_uid
    ds.DimensionOrganizationSequence = [dim_org]
    dim_index = []
    for pointer, label in (
        (0x0048021E, "Column Position In Total Image Pixel Matrix"),
        (0x0048021F, "Row Position In Total Image Pixel Matrix"),
    ):
        item = Dataset()
        item.DimensionOrganizationUID = dim_org_uid
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = 0x0048021A  # PlanePositionSlideSequence
        item.DimensionDescriptionLabel = label[:64]
        dim_index.append(item)
    ds.DimensionIndexSequence = dim_index

    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = n_frames
    ds.Rows = FRAME_SIZE
    ds.Columns = FRAME_SIZE
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [_ds(round(ratio, 2))]
    ds.LossyImageCompressionMethod = ["ISO_10918_1"]

    ds.ContentQualification = "RESEARCH"
    ds.SpecimenLabelInImage = "NO"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.ImagedVolumeWidth = width * spacing
    ds.ImagedVolumeHeight = height * spacing
    ds.ImagedVolumeDepth = 1.0  # micrometres
    ds.TotalPixelMatrixColumns = width
    ds.TotalPixelMatrixRows = height
    ds.TotalPixelMatrixFocalPlanes = 1
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = "20.0"
    origin.YOffsetInSlideCoordinateSystem = "40.0"
    ds.TotalPixelMatrixOriginSequence = [origin]
    ds.ImageOrientationSlide = ["0", "-1", "0", "-1", "0", "0"]
    ds.RecognizableVisualFeatures = "NO"

    ds.ContainerIdentifier = f"PE-SLIDE-{spec.name}"
    ds.IssuerOfTheContainerIdentifierSequence = []
    ds.ContainerTypeCodeSequence = [_code("433466003", "SCT", "Microscope slide")]
    specimen = Dataset()
    specimen.SpecimenIdentifier = f"PE-SPECIMEN-{spec.name}"
    specimen.SpecimenUID = _uid(spec.name, "specimen")
    specimen.IssuerOfTheSpecimenIdentifierSequence = []
    specimen.SpecimenShortDescription = "synthetic H&E-like pattern (not real tissue)"
    specimen.SpecimenPreparationSequence = []
    ds.SpecimenDescriptionSequence = [specimen]

    ds.AcquisitionContextSequence = []
    ds.NumberOfOpticalPaths = 1
    optical_path = Dataset()
    optical_path.OpticalPathIdentifier = "1"
    optical_path.OpticalPathDescription = "brightfield"
    optical_path.IlluminationTypeCodeSequence = [_code("111744", "DCM", "Brightfield illumination")]
    optical_path.IlluminationColorCodeSequence = [_code("414298005", "SCT", "Full Spectrum")]
    ds.OpticalPathSequence = [optical_path]

    pixel_measures = Dataset()
    pixel_measures.PixelSpacing = [_ds(spacing), _ds(spacing)]
    pixel_measures.SliceThickness = _ds(0.001)
    frame_type = Dataset()
    frame_type.FrameType = image_type
    optical_path_id = Dataset()
    optical_path_id.OpticalPathIdentifier = "1"
    shared = Dataset()
    shared.PixelMeasuresSequence = [pixel_measures]
    shared.WholeSlideMicroscopyImageFrameTypeSequence = [frame_type]
    shared.OpticalPathIdentificationSequence = [optical_path_id]
    ds.SharedFunctionalGroupsSequence = [shared]
    return ds


def _write_level(spec: SampleSpec, level: int, path: pathlib.Path) -> None:
    n_frames = FrameGrid(*spec.level_size(level), FRAME_SIZE, FRAME_SIZE).count
    frames = [_encode_frame(_render_frame(spec, level, i)) for i in range(n_frames)]
    ds = _level_dataset(spec, level, n_frames, sum(len(f) for f in frames))
    ds.PixelData = encapsulate(frames, has_bot=True)
    del frames
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    # write next to the target and rename, so that a reader never sees a partial file
    partial = path.with_name(path.name + ".partial")
    try:
        ds.save_as(partial, enforce_file_format=True)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_sample_slide(out_dir: pathlib.Path, name: str) -> list[pathlib.Path]:
    """Writes the slide's DICOM files (one file per pyramid level) into out_dir/name/ and returns
    their paths (finest level first)."""
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; known: {sorted(SAMPLES)}")
    return write_slide(out_dir, SAMPLES[name])


def write_slide(out_dir: pathlib.Path, spec: SampleSpec) -> list[pathlib.Path]:
    """Writes the slide of any spec (e.g. a tiny one for a test) into out_dir/spec.name/; its
    UIDs derive from spec.name, so distinct names give distinct slides."""
    name = spec.name
    slide_dir = pathlib.Path(out_dir) / name
    slide_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for level in range(len(spec.level_downsamples)):
        path = slide_dir / f"level-{level}.dcm"
        _write_level(spec, level, path)
        paths.append(path)
    return paths


def write_samples(
    out_dir: pathlib.Path, names: Sequence[str] | None = None
) -> dict[str, list[pathlib.Path]]:
    """Writes the named samples (all of SAMPLES by default); returns name -> level file paths."""
    selected = list(SAMPLES) if names is None else list(names)
    unknown = [name for name in selected if name not in SAMPLES]
    if unknown:
        raise KeyError(f"unknown samples {unknown}; known: {sorted(SAMPLES)}")
    return {name: write_sample_slide(out_dir, name) for name in selected}
