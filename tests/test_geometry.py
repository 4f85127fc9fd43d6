"""Header checks before any pixel is read (dicom_io/geometry.py) and the local listing."""

from __future__ import annotations

import os

import pydicom
import pytest
from pydicom.sequence import Sequence

from tests import bad_slides as bad
from transforms.dicom_io import geometry
from transforms.dicom_io.byte_ranges import list_uris
from transforms.errors import ReasonCode, SlideError
from transforms.records import FolderFailure, SlideRecord
from transforms.sources.dicom_files import record_from_headers


def test_the_listing_opens_only_regular_files_each_once(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "slide.dcm").write_bytes(b"x")
    os.mkfifo(tmp_path / "a" / "pipe.dcm")  # opening it would block the run
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # a link loop
    os.symlink(tmp_path / "a" / "slide.dcm", tmp_path / "again.dcm")  # a second name
    os.symlink(tmp_path / "missing", tmp_path / "broken.dcm")
    (listed,) = list_uris(str(tmp_path))  # once, under the first name the walk reaches
    assert os.path.realpath(listed) == str((tmp_path / "a" / "slide.dcm").resolve())


def _header(**values) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID = "1.2.3", "1.2.4", "1.2.5"
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = 1000, 700
    ds.Columns = ds.Rows = 256
    ds.NumberOfFrames = 12
    ds.SamplesPerPixel, ds.BitsAllocated, ds.PhotometricInterpretation = 3, 8, "YBR_FULL_422"
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def _positions(ds: pydicom.Dataset, at: list[tuple[int, int]]) -> None:
    items = []
    for column, row in at:
        position = pydicom.Dataset()
        position.ColumnPositionInTotalImagePixelMatrix = column
        position.RowPositionInTotalImagePixelMatrix = row
        item = pydicom.Dataset()
        item.PlanePositionSlideSequence = Sequence([position])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.NumberOfFrames = len(at)


def test_a_consistent_header_has_no_problem():
    assert geometry.header_problem(_header(), "instance 1.2.3") is None


@pytest.mark.parametrize(
    ("values", "reason", "words"),
    [
        ({"NumberOfFrames": 10}, ReasonCode.INCONSISTENT_FRAMES, "needs 4 x 3 = 12"),
        ({"TotalPixelMatrixColumns": 1400}, ReasonCode.INCONSISTENT_FRAMES, "1400 x 700"),
        ({"SOPInstanceUID": "1." + "2" * 70}, ReasonCode.MALFORMED_HEADER, "72 characters"),
        ({"SeriesInstanceUID": "1.02.3"}, ReasonCode.MALFORMED_HEADER, "not digits and dots"),
        ({"BitsAllocated": 16}, ReasonCode.UNSUPPORTED_PIXEL_FORMAT, "16 bits allocated"),
        ({"SamplesPerPixel": 1}, ReasonCode.UNSUPPORTED_PIXEL_FORMAT, "1 samples per pixel"),
        ({"DimensionOrganizationType": "3D"}, ReasonCode.UNSUPPORTED_TILING, "3D"),
        ({"Columns": 0}, ReasonCode.MALFORMED_HEADER, "must be positive"),
    ],
)
def test_each_header_problem_has_its_reason(values, reason, words):
    problem = geometry.header_problem(_header(**values), "instance 1.2.3")
    assert isinstance(problem, SlideError) and problem.reason is reason, problem
    assert words in problem.message and "instance 1.2.3" in problem.message


def test_sparse_positions_map_to_row_major_frames():
    ds = _header()
    _positions(ds, [(769, 513), (1, 1), (257, 257)])  # stored out of order, 9 frames absent
    assert geometry.sparse_frame_map(ds) == {12: 1, 1: 2, 6: 3}
    assert geometry.header_problem(ds, "x") is None
    refused = geometry.header_problem(ds, "x", sparse_ok=False)  # read through DICOMweb
    assert refused is not None and refused.reason is ReasonCode.UNSUPPORTED_TILING


@pytest.mark.parametrize(
    ("at", "reason"),
    [
        ([(1, 1), (300, 1)], ReasonCode.UNSUPPORTED_TILING),  # off the frame grid
        ([(1, 1), (1025, 1)], ReasonCode.UNSUPPORTED_TILING),  # outside the matrix
        ([(1, 1), (1, 1)], ReasonCode.INCONSISTENT_FRAMES),  # one place twice
    ],
)
def test_bad_sparse_positions_are_refused(at, reason):
    ds = _header()
    _positions(ds, at)
    problem = geometry.header_problem(ds, "x")
    assert problem is not None and problem.reason is reason, problem


def test_a_sparse_level_is_read_by_position_except_through_dicomweb(tmp_path):
    """The byte-range reader places sparse frames by position; a series whose pixels will be
    read through DICOMweb (ez-wsi places frames by index) is refused instead."""
    slide = bad.tiny_slide(tmp_path)
    headers = [
        (f"gs://bucket/{p.name}", pydicom.dcmread(p, stop_before_pixels=True))
        for p in sorted(slide.glob("level-*.dcm"))
    ]
    level_0 = headers[0][1]
    _positions(level_0, [(257, 1), (1, 1)])  # two of the 8 x 6 frames, out of order
    series = str(level_0.SeriesInstanceUID)
    assert isinstance(record_from_headers(series, headers), SlideRecord)
    refused = record_from_headers(series, headers, sparse_ok=False)
    assert isinstance(refused, FolderFailure)
    assert refused.error.reason is ReasonCode.UNSUPPORTED_TILING
