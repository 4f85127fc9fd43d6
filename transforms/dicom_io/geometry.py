"""Header checks of one WSI instance before any pixel is read ("trust no header", DESIGN.md §2).

Real archives hold every converter's quirks. Each check here returns a `SlideError` naming the
instance and the value (never raises for a bad header), so the caller decides whether the
instance's problem sinks the slide (a level the run needs) or only that level (one it does not):

- identity: SOP, Series and Study Instance UIDs present and valid DICOM UIDs (at most 64
  characters, digits and dots): they become table values and the slide's UUID;
- pixel format: 8-bit, 3 samples per pixel (RGB or YCbCr) - patches are RGB;
- tiling: TILED_FULL (or no DimensionOrganizationType, which TILED_FULL is the default
  reading of), or TILED_SPARSE with every per-frame position on the frame grid, once: the
  byte-range reader (dicom_io/byte_ranges.py) then places each frame by its position and fills
  absent frames with background. Read through DICOMweb (ez-wsi places frames by index) or
  split into a concatenation, a sparse level is refused (`unsupported_tiling`) unless its
  positions are the full row-major grid: read by index it would misplace tiles or leave black
  holes in tissue;
- frame grid: NumberOfFrames equals the TotalPixelMatrix's grid of Rows x Columns frames;
- stored frames (local files): the frames actually in PixelData (Extended or Basic Offset Table,
  else the fragment items; native pixels by length) equal NumberOfFrames, and PixelData is not
  cut short.
"""

from __future__ import annotations

import math

import pydicom

from transforms.errors import ReasonCode, SlideError

TILED_FULL = "TILED_FULL"
TILED_SPARSE = "TILED_SPARSE"
RGB_PHOTOMETRIC = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}
_UID_MAX = 64
_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian
_SEQ_END = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD)
_UNDEFINED = 0xFFFFFFFF


def uid_problem(value: object, keyword: str, where: str) -> str | None:
    """Why `value` is not a usable DICOM UID for `keyword` (a sentence), or None."""
    if value is None or str(value).strip() == "":
        return f"{where} has no {keyword}"
    text = str(value)
    if len(text) > _UID_MAX:
        return (
            f"{where} has a {keyword} of {len(text)} characters, over DICOM's {_UID_MAX}: {text!r}"
        )
    parts = text.split(".")
    if not all(p.isdigit() and p.isascii() and (p == "0" or p[0] != "0") for p in parts):
        return f"{where} has a {keyword} that is not digits and dots: {text[:80]!r}"
    return None


def identity_problem(ds: pydicom.Dataset, where: str) -> SlideError | None:
    """Study, Series and SOP Instance UIDs of one header, checked before they are used."""
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        problem = uid_problem(ds.get(keyword), keyword, where)
        if problem:
            return SlideError(ReasonCode.MALFORMED_HEADER, problem)
    return None


def _int(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    return int(value)


def pixel_format_problem(ds: pydicom.Dataset, where: str) -> SlideError | None:
    """8-bit three-sample pixels, or why not (checked only where the header says)."""
    samples = _int(ds, "SamplesPerPixel")
    bits = _int(ds, "BitsAllocated")
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if (
        (samples is not None and samples != 3)
        or (bits is not None and bits != 8)
        or (photometric and photometric not in RGB_PHOTOMETRIC)
    ):
        return SlideError(
            ReasonCode.UNSUPPORTED_PIXEL_FORMAT,
            f"{where} has {samples} samples per pixel, {bits} bits allocated, photometric "
            f"interpretation {photometric or 'unknown'}; only 8-bit colour (RGB or YCbCr) "
            "slides are embedded",
        )
    return None


def sparse_positions_are_full(ds: pydicom.Dataset) -> bool:
    """True when a TILED_SPARSE instance's per-frame positions are exactly the row-major grid
    that TILED_FULL implies (every frame present, in order), so it reads as TILED_FULL."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    width, height = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
    fw, fh = int(ds.Columns), int(ds.Rows)
    across = math.ceil(width / fw)
    expected = across * math.ceil(height / fh)
    if not per_frame or len(per_frame) != expected:
        return False
    for k, item in enumerate(per_frame):
        try:
            position = item.PlanePositionSlideSequence[0]
            column = int(position.ColumnPositionInTotalImagePixelMatrix)
            row = int(position.RowPositionInTotalImagePixelMatrix)
        except (AttributeError, IndexError, TypeError, ValueError):
            return False
        r, c = divmod(k, across)
        if (column, row) != (c * fw + 1, r * fh + 1):
            return False
    return True


def sparse_frame_map(ds: pydicom.Dataset, where: str = "the instance") -> dict[int, int] | None:
    """{whole-level frame number (1-based, row-major as TILED_FULL numbers them): stored frame
    number} of a TILED_SPARSE instance, from its per-frame PlanePositionSlideSequence; None for
    any other organization. Raises SlideError when a position is off the frame grid, outside
    the matrix or repeated, or when positions and NumberOfFrames disagree."""
    organization = str(ds.get("DimensionOrganizationType", "") or "").upper()
    if organization != TILED_SPARSE:
        return None
    width, height = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
    fw, fh = int(ds.Columns), int(ds.Rows)
    across = math.ceil(width / fw)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames:
        raise SlideError(
            ReasonCode.INCONSISTENT_FRAMES,
            f"{where} is TILED_SPARSE with NumberOfFrames {frames} but {len(per_frame)} "
            "per-frame positions (PerFrameFunctionalGroupsSequence)",
        )
    mapping: dict[int, int] = {}
    for k, item in enumerate(per_frame, start=1):
        try:
            position = item.PlanePositionSlideSequence[0]
            column = int(position.ColumnPositionInTotalImagePixelMatrix)
            row = int(position.RowPositionInTotalImagePixelMatrix)
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise SlideError(
                ReasonCode.UNSUPPORTED_TILING,
                f"{where} is TILED_SPARSE but frame {k} has no readable position ({exc!r})",
            ) from None
        if (column - 1) % fw or (row - 1) % fh or not (1 <= column <= width and 1 <= row <= height):
            raise SlideError(
                ReasonCode.UNSUPPORTED_TILING,
                f"{where} is TILED_SPARSE and frame {k} is at column {column}, row {row}, not "
                f"on its {fw} x {fh} px frame grid inside the {width} x {height} px matrix",
            )
        number = (row - 1) // fh * across + (column - 1) // fw + 1
        if number in mapping:
            raise SlideError(
                ReasonCode.INCONSISTENT_FRAMES,
                f"{where} is TILED_SPARSE and frames {mapping[number]} and {k} are both at "
                f"column {column}, row {row}",
            )
        mapping[number] = k
    return mapping


def frame_grid_problem(
    ds: pydicom.Dataset, where: str, sparse_ok: bool = True
) -> SlideError | None:
    """The frame grid the header declares: sizes positive, tiling readable, NumberOfFrames
    matching TotalPixelMatrix in frames of Rows x Columns (TILED_FULL). Instances of a
    concatenation (ConcatenationUID) hold part of the grid each; their sum is not checked."""
    try:
        width, height = _int(ds, "TotalPixelMatrixColumns"), _int(ds, "TotalPixelMatrixRows")
        fw, fh = _int(ds, "Columns"), _int(ds, "Rows")
        frames = _int(ds, "NumberOfFrames", 1)
    except (TypeError, ValueError) as exc:
        return SlideError(ReasonCode.MALFORMED_HEADER, f"{where} has a non-numeric size: {exc}")
    missing = [
        k
        for k, v in [
            ("TotalPixelMatrixColumns", width), ("TotalPixelMatrixRows", height),
            ("Columns", fw), ("Rows", fh),
        ]
        if v is None
    ]  # fmt: skip
    if missing:
        return SlideError(ReasonCode.MALFORMED_HEADER, f"{where} has no {', '.join(missing)}")
    if min(width, height, fw, fh, frames) <= 0:
        return SlideError(
            ReasonCode.MALFORMED_HEADER,
            f"{where} declares a {width} x {height} px matrix of {fw} x {fh} px frames and "
            f"{frames} frames; every size must be positive",
        )
    organization = str(ds.get("DimensionOrganizationType", "") or TILED_FULL).upper()
    if organization == TILED_SPARSE and not sparse_positions_are_full(ds):
        planes = (_int(ds, "TotalPixelMatrixFocalPlanes", 1) or 1) * (
            _int(ds, "NumberOfOpticalPaths", 1) or 1
        )
        if planes > 1:  # several planes are refused as such (multiple_planes)
            return None
        if not sparse_ok or ds.get("ConcatenationUID"):
            return SlideError(
                ReasonCode.UNSUPPORTED_TILING,
                f"{where} is TILED_SPARSE with frame positions that are not the full grid, "
                "read here through DICOMweb or split into a concatenation; it is refused "
                "rather than read as TILED_FULL, which would misplace tiles",
            )
        try:
            sparse_frame_map(ds, where)
        except SlideError as error:
            return error
        return None  # read by position (byte_ranges.py); absent frames are background
    if organization not in (TILED_FULL, TILED_SPARSE):
        return SlideError(
            ReasonCode.UNSUPPORTED_TILING,
            f"{where} has DimensionOrganizationType {organization}; only TILED_FULL is read",
        )
    planes = (_int(ds, "TotalPixelMatrixFocalPlanes", 1) or 1) * (
        _int(ds, "NumberOfOpticalPaths", 1) or 1
    )
    if ds.get("ConcatenationUID") or planes > 1:  # several planes are refused as such
        return None
    across, down = math.ceil(width / fw), math.ceil(height / fh)
    if frames != across * down:
        return SlideError(
            ReasonCode.INCONSISTENT_FRAMES,
            f"{where} declares NumberOfFrames {frames}, but its {width} x {height} px matrix "
            f"(TotalPixelMatrixColumns x Rows) in {fw} x {fh} px frames needs {across} x {down}"
            f" = {across * down}",
        )
    return None


def header_problem(ds: pydicom.Dataset, where: str, sparse_ok: bool = True) -> SlideError | None:
    """The first problem of one WSI instance's header (identity, pixel format, frame grid).
    `sparse_ok`: the instance is read by the byte-range reader, which places TILED_SPARSE
    frames by position (ez-wsi's DICOMweb reader does not)."""
    return (
        identity_problem(ds, where)
        or pixel_format_problem(ds, where)
        or frame_grid_problem(ds, where, sparse_ok)
    )
