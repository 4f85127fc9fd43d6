"""Planning a slide: tissue mask at ~2X, the patch grid at ~20x, thumbnails, work chunks; and
the per-slide elements that travel the DAG after planning (SlidePlan with its PatchChunks,
SlideResult).

`plan_slide` is a plain function of a slide record and an opened ez-wsi slide; the Beam stage
around it only keys and emits its results. Only coordinates leave this step, never pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from transforms import clustering, patches, tissue
from transforms import mask_level as mask_level_image
from transforms.dicom_io import pixel_hash
from transforms.dicom_io.pixel_data import instance_hashes
from transforms.errors import ReasonCode, SlideError
from transforms.records import SlideRecord

PIXELDATA_SHA512_MODES = ("local", "all")


@dataclass(frozen=True)
class PlanParams:
    v_min: int = 0
    v_max: int = 204
    min_tissue_fraction: float = 0.5
    patch_size: int = 224
    chunk_size: int = 256
    thumbnail_max_size: int = 1024
    jpeg_quality: int = 90
    # Whose PixelData SHA-512 is computed: "local" (local files only, read from disk anyway)
    # or "all" (also gs://, s3://, http(s) and DICOMweb instances, streamed once more:
    # dicom_io/pixel_hash.py; costs reading the embedding level's whole PixelData value).
    pixeldata_sha512: str = "local"
    # ~2X: a mask level at least twice finer is read in tiles and reduced (transforms/mask_level)
    mask_spacing_mm: float = 0.005

    def __post_init__(self) -> None:
        if self.pixeldata_sha512 not in PIXELDATA_SHA512_MODES:
            raise ValueError(
                f"hashing.pixeldata_sha512: one of {PIXELDATA_SHA512_MODES}, "
                f"not {self.pixeldata_sha512!r}"
            )


@dataclass(frozen=True)
class PatchChunk:
    """Neighbouring patches of one slide, read as one region and embedded together."""

    record: SlideRecord
    chunk_index: int
    indices: np.ndarray  # int64 [n]: rows of the slide's embedding arrays
    coords: np.ndarray  # int64 [n, 2]

    def __repr__(self) -> str:
        return f"PatchChunk({self.record.instance_uuid}#{self.chunk_index}, {len(self.indices)})"


@dataclass(frozen=True)
class SlidePlan:
    """Everything about a slide decided before its patches are embedded."""

    record: SlideRecord
    coords: np.ndarray  # int64 [N, 2] patch-source [x, y], row-major
    tissue_fraction: np.ndarray  # float32 [N]
    grid_columns: int
    grid_rows: int
    mask_tissue_share: float  # share of mask-level pixels that are tissue
    thumbnail_jpeg: bytes
    thumbnail_mask_jpeg: bytes
    instance_md5: str
    pixeldata_sha512: str
    # How the mask image was made from the mask level: reduced by this integer factor
    # (1: the level as is), giving an image of mask_image_size (width, height).
    mask_factor: int = 1
    mask_image_size: tuple[int, int] = (0, 0)
    # The patches in reading order: neighbouring patches in chunks of at most
    # PlanParams.chunk_size, read and embedded one after another (stages.embed_plan).
    chunks: tuple[PatchChunk, ...] = ()

    def __repr__(self) -> str:
        return f"SlidePlan({self.record.instance_uuid}, {len(self.coords)} patches)"


@dataclass(frozen=True)
class SlideResult:
    """A slide with all its embeddings and their clustering, ready to be written."""

    plan: SlidePlan
    embeddings: np.ndarray  # float32 [N, D], row k from plan.coords[k]
    clusters: clustering.Clustering

    def __repr__(self) -> str:
        return f"SlideResult({self.plan.record.instance_uuid}, {len(self.embeddings)})"


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise SlideError(ReasonCode.INTERNAL_ERROR, "could not encode the thumbnail as JPEG")
    return encoded.tobytes()


def _thumbnail(mask_image: np.ndarray, max_size: int) -> np.ndarray:
    height, width = mask_image.shape[:2]
    scale = min(1.0, max_size / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(mask_image, size, interpolation=cv2.INTER_AREA) if scale < 1 else mask_image


def plan_slide(record: SlideRecord, params: PlanParams) -> SlidePlan:
    """Computes the mask, grid, thumbnails and chunks of one slide."""
    choice = record.levels
    if min(choice.source_width, choice.source_height) < params.patch_size:
        # Checked before any pixel is read: not one whole patch fits, whatever the tissue.
        raise SlideError(
            ReasonCode.TOO_SMALL,
            f"instance {record.sop_instance_uid} is {choice.source_width} x "
            f"{choice.source_height} px at the embedding spacing, smaller than one "
            f"{params.patch_size} px patch",
        )
    slide = patches.open_slide(record.files, record.dicomweb_auth)
    mask_level = patches.level_of(slide, record.levels.mask.sop_instance_uid)
    factor = mask_level_image.mask_factor(choice.mask.spacing.mm, params.mask_spacing_mm)
    mask_image = mask_level_image.read_mask_image(slide, mask_level, factor).image
    mask = tissue.tissue_mask(mask_image, params.v_min, params.v_max)
    grid = tissue.patch_grid(
        mask,
        choice.source_width,
        choice.source_height,
        params.patch_size,
        params.min_tissue_fraction,
    )
    if len(grid.coords) == 0:
        raise SlideError(
            ReasonCode.NO_TISSUE,
            f"no {params.patch_size} px patch has tissue fraction >= "
            f"{params.min_tissue_fraction} ({mask.mean():.1%} of the mask level is tissue, "
            f"V in ({params.v_min}, {params.v_max}])",
        )
    thumbnail = _thumbnail(mask_image, params.thumbnail_max_size)
    thumbnail_mask = tissue.thumbnail_with_patches(
        thumbnail, grid.coords, params.patch_size, choice.source_width, choice.source_height
    )
    # Local files: both hashes (cheap). Remote instances: the MD5 is what the source reports
    # (IDC's instance_hash, the bucket's object MD5); the SHA-512 only when asked for, since it
    # streams the whole PixelData value once more.
    md5 = sha512 = None
    if record.is_local:
        md5, sha512 = instance_hashes(record.embedding_file)
    elif params.pixeldata_sha512 == "all":
        sha512, _ = pixel_hash.pixeldata_sha512(record.embedding_file, record.dicomweb_auth)
    side = patches.block_side(params.chunk_size)
    chunks = tuple(
        PatchChunk(record, k, idx, grid.coords[idx])
        for k, idx in enumerate(patches.chunk_order(grid.coords // params.patch_size, side))
    )
    return SlidePlan(
        record=record,
        coords=grid.coords,
        tissue_fraction=grid.tissue_fraction,
        grid_columns=grid.columns,
        grid_rows=grid.rows,
        mask_tissue_share=float(mask.mean()),
        thumbnail_jpeg=_jpeg(thumbnail, params.jpeg_quality),
        thumbnail_mask_jpeg=_jpeg(thumbnail_mask, params.jpeg_quality),
        instance_md5=record.instance_hash or md5,
        pixeldata_sha512=sha512,
        mask_factor=factor,
        mask_image_size=(mask_image.shape[1], mask_image.shape[0]),
        chunks=chunks,
    )
