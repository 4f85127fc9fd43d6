"""The QC picture: patches drawn on the thumbnail in the fixed colour of their k-means label."""

from __future__ import annotations

import uuid

import cv2
import numpy as np
import pytest

from pipeline.cli import main
from transforms.outputs import artifacts, layout
from transforms.search import qc

PATCH = 224


def centre_pixel(coord, level_size, image_size, scale=1.0):
    """(row, col) in an image of `image_size` (w, h) of a patch's centre."""
    (x, y), (lw, lh), (w, h) = coord, level_size, image_size
    return int((y + PATCH / 2) * h * scale / lh), int((x + PATCH / 2) * w * scale / lw)


def test_label_colours_are_fixed_distinct_and_independent_of_count():
    colours = qc.label_colours(500)
    assert colours.dtype == np.uint8 and colours.shape == (500, 3)
    assert len(np.unique(colours, axis=0)) == 500
    assert np.array_equal(qc.label_colours(7), colours[:7])
    assert np.array_equal(qc.label_colours(500), colours)
    assert (colours.max(axis=1) >= 160).all()  # none near black
    assert (colours.min(axis=1) <= 120).all()  # none near the white background


def test_patch_label_image_fills_each_patch_with_its_labels_colour():
    rng = np.random.default_rng(0)
    level, thumb_size = (224 * 20, 224 * 12), (200, 120)  # a patch is 10 x 10 thumbnail px
    thumbnail = rng.integers(0, 255, (thumb_size[1], thumb_size[0], 3), np.uint8)
    cells = np.argwhere(rng.random((12, 20)) < 0.5)
    coords = cells[:, ::-1] * PATCH
    labels = rng.integers(0, 9, len(coords))
    image = qc.patch_label_image(thumbnail, coords, labels, (PATCH, PATCH), level)
    colours = qc.label_colours(9)
    for coord, label in zip(coords, labels, strict=True):
        row, col = centre_pixel(coord, level, thumb_size)
        assert np.array_equal(image[row, col], colours[label])
    untouched = np.ones((12, 20), bool)
    untouched[cells[:, 0], cells[:, 1]] = False
    for i, j in np.argwhere(untouched):  # cells without a patch keep the thumbnail
        block = np.s_[i * 10 + 1 : i * 10 + 9, j * 10 + 1 : j * 10 + 9]
        assert np.array_equal(image[block], thumbnail[block])
    with pytest.raises(ValueError, match="coordinates but"):
        qc.patch_label_image(thumbnail, coords, labels[:-1], (PATCH, PATCH), level)


def test_upscale_makes_patches_visible_within_a_size_cap():
    # A 100k px wide slide in a 1024 px thumbnail: a patch would be ~2.3 px.
    scale = qc.upscale_for_patches(1024, PATCH, 100_000, min_patch_px=4, max_px=4096)
    assert PATCH * 1024 * scale / 100_000 == pytest.approx(4)
    assert qc.upscale_for_patches(1024, PATCH, 1_000_000, 4, 4096) == 4  # capped
    assert qc.upscale_for_patches(910, PATCH, 7280, 4, 4096) == 1  # never shrinks


def test_show_writes_the_picture_of_a_slide(tmp_path):
    """`pathembed show` on a slide written by the project's artifact writer."""
    rng = np.random.default_rng(1)
    root, instance_uuid = tmp_path / "out", str(uuid.uuid4())
    level = (224 * 40, 224 * 30)  # thumbnail 120 x 90: a patch is 3 px, upscaled to >= 6
    thumbnail = np.full((90, 120, 3), 230, np.uint8)
    cells = np.argwhere(rng.random((30, 40)) < 0.4)
    coords = (cells[:, ::-1] * PATCH).astype(np.int64)
    labels = rng.integers(0, 500, len(coords)).astype(np.int64)
    paths = layout.ArtifactPaths.for_slide(str(root), instance_uuid, "v1", 500)
    identity = {key: "1.2.3" for key in ("study_instance_uid", "series_instance_uid",
                                         "sop_instance_uid", "instance_hash",
                                         "instance_pixeldata_SHA512_hash")}  # fmt: skip
    metadata = artifacts.build_metadata(
        identity={**identity, "instance_uuid": instance_uuid}, paths=paths,
        model_name="stub-tiny", model_version="test", dataset_version="v1",
        embedding_count=len(coords), number_of_centroids=500, patch_size=PATCH,
        level_width=level[0], level_height=level[1], extra={},
    )  # fmt: skip
    jpeg = cv2.imencode(".jpg", thumbnail)[1].tobytes()
    artifacts.write_artifacts(paths, {
        paths.metadata: artifacts.json_bytes(metadata), paths.thumbnail: jpeg,
        paths.coordinates: artifacts.npy_bytes(coords), paths.labels: artifacts.npy_bytes(labels),
    }, {}, "run")  # fmt: skip
    png = tmp_path / "qc.png"

    code = main(["show", instance_uuid, "--output-root", str(root), "--out", str(png),
                 "--min-patch-px", "6"])  # fmt: skip

    assert code == 0
    picture = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB)
    assert picture.shape == (180, 2 * 240 + qc.GAP_PX, 3)  # upscaled x2: 6 px per patch
    assert (picture[:, 240 : 240 + qc.GAP_PX] == 255).all()
    colours = qc.label_colours(500)
    right = picture[:, 240 + qc.GAP_PX :]
    for coord, label in zip(coords, labels, strict=True):
        row, col = centre_pixel(coord, level, (120, 90), scale=2)
        assert np.array_equal(right[row, col], colours[label])
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), 1), cv2.COLOR_BGR2RGB)
    upscaled = cv2.resize(decoded, (240, 180), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(picture[:, :240], upscaled)
