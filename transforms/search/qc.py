"""The QC picture of a slide (the seed's Figure 1): where patches were sampled, by k-means label.

The slide thumbnail is drawn twice side by side: as it is, and with every sampled patch as a
square filled with the colour of its centroid index (label). Colours come from one fixed map
over the label index, so label 7 has the same colour on every slide and in every run, and a
reader can compare pictures. For looking at a slide, not for measurements: squares are drawn
at thumbnail resolution (upscaled so a patch spans a few pixels at least).
"""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

GAP_PX = 8  # white space between the two panels
_GOLDEN = 0.618033988749895  # hue step: consecutive labels get well separated hues


def label_colours(count: int) -> np.ndarray:
    """uint8 RGB [count, 3]: the fixed colour of each label index 0..count-1.

    Hues step by the golden ratio, with three saturation/value rings so that the 500 labels of
    a clustered slide get distinct colours, none near the white background or black.
    """
    colours = []
    for label in range(count):
        hue = (label * _GOLDEN) % 1.0
        saturation = (0.95, 0.7, 0.85)[label % 3]
        value = (0.95, 0.8, 0.65)[(label // 3) % 3]
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.array(colours, np.uint8).reshape(count, 3)


def upscale_for_patches(
    thumbnail_width: int, patch_size: int, level_width: int, min_patch_px: int, max_px: int
) -> float:
    """Thumbnail scale at which a patch spans >= min_patch_px, capped at max_px wide."""
    patch_px = patch_size * thumbnail_width / level_width
    return float(np.clip(min_patch_px / patch_px, 1.0, max(1.0, max_px / thumbnail_width)))


def patch_label_image(
    thumbnail: np.ndarray,
    coordinates: np.ndarray,
    labels: np.ndarray,
    patch_size: tuple[int, int],
    level_size: tuple[int, int],
) -> np.ndarray:
    """The thumbnail with each patch a square in its label's colour.

    `coordinates` are the patches' upper-left [x, y] in the patch-source frame of size
    `level_size` (metadata's slide_pyramid_level_width/height); squares scale to the thumbnail
    the way the pipeline's sampling mask does (tissue.thumbnail_with_patches).
    """
    if len(coordinates) != len(labels):
        raise ValueError(f"{len(coordinates)} coordinates but {len(labels)} labels")
    out = thumbnail.copy()
    colours = label_colours(int(labels.max()) + 1 if len(labels) else 0)
    sx, sy = out.shape[1] / level_size[0], out.shape[0] / level_size[1]
    for (x, y), label in zip(coordinates, labels, strict=True):
        x0, y0 = int(x * sx), int(y * sy)
        x1 = int(np.ceil((x + patch_size[0]) * sx))
        y1 = int(np.ceil((y + patch_size[1]) * sy))
        out[y0:y1, x0:x1] = colours[label]
    return out


def qc_picture(
    thumbnail: np.ndarray,
    coordinates: np.ndarray,
    labels: np.ndarray,
    patch_size: tuple[int, int],
    level_size: tuple[int, int],
    scale: float = 1.0,
) -> np.ndarray:
    """RGB [h, 2w + GAP_PX, 3]: the thumbnail (scaled), a white gap, the labelled patches."""
    if scale != 1.0:
        size = (round(thumbnail.shape[1] * scale), round(thumbnail.shape[0] * scale))
        thumbnail = cv2.resize(thumbnail, size, interpolation=cv2.INTER_LINEAR)
    labelled = patch_label_image(thumbnail, coordinates, labels, patch_size, level_size)
    gap = np.full((thumbnail.shape[0], GAP_PX, 3), 255, np.uint8)
    return np.concatenate([thumbnail, gap, labelled], axis=1)


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode the picture as PNG")
    return encoded.tobytes()
