"""Run configuration: YAML files under configs/, overridden by command-line flags.

The YAML layout mirrors these dataclasses one to one; unknown keys are errors, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from transforms.clustering import KMeansParams
from transforms.dicom_io.gpu_decode import MODES as GPU_DECODE_MODES
from transforms.levels import LevelRule
from transforms.outputs.layout import DATASET_VERSION
from transforms.patches import ICC_PROFILES
from transforms.plan import PlanParams

PIPELINE_VERSION = "0.1.0"


@dataclass(frozen=True)
class SourceConfig:
    """Where slides come from and how their pixels are read (configs/local.yaml documents it)."""

    kind: str = "dicom_folder"  # dicom_folder | manifest | idc_index | bigquery | dicomweb
    input: str | None = None  # folder / gs:// or s3:// prefix, or manifest file
    dicomweb_url: str | None = None
    dicomweb_auth: str = "auto"  # auto | google | none
    collections: tuple[str, ...] = ()
    limit: int | None = None
    sample: int | None = None
    bigquery_table: str = "bigquery-public-data.idc_v25.dicom_all"
    bigquery_project: str | None = None
    # Current gcs_url/aws_url per instance (a pinned release's URLs are never updated);
    # null = the release table's own URLs.
    bigquery_mutable_table: str | None = "bigquery-public-data.idc_current.mutable_metadata"
    idc_bucket: str = "s3://idc-open-data"
    # Where IDC sources read pixels: bucket (BigQuery's gcs_url, idc_index's idc_bucket),
    # aws (BigQuery's aws_url) or dicomweb (dicomweb_url, e.g. IDC's DICOM store).
    read_from: str = "bucket"
    manifest_out: str | None = None

    KINDS = ("dicom_folder", "manifest", "idc_index", "bigquery", "dicomweb")

    def validate(self) -> None:
        """Raises ValueError saying which key is missing or wrong for this kind of source."""
        if self.kind not in self.KINDS:
            raise ValueError(f"source.kind {self.kind!r} is not one of {', '.join(self.KINDS)}")
        if self.kind in ("dicom_folder", "manifest") and not self.input:
            what = "FOLDER (or gs:// / s3:// prefix)" if self.kind == "dicom_folder" else "FILE"
            raise ValueError(f"source {self.kind} needs --input {what} (source.input)")
        if self.kind == "dicomweb" and not self.dicomweb_url:
            raise ValueError("source dicomweb needs --dicomweb-url (source.dicomweb_url)")
        if self.read_from not in ("bucket", "aws", "dicomweb"):
            raise ValueError(f"source.read_from {self.read_from!r}: bucket, aws or dicomweb")
        if self.read_from == "dicomweb" and not self.dicomweb_url:
            raise ValueError("source.read_from dicomweb needs --dicomweb-url")
        if self.dicomweb_auth not in ("auto", "google", "none"):
            raise ValueError(f"source.dicomweb_auth {self.dicomweb_auth!r}: auto, google or none")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "stub-tiny"
    revision: str | None = None
    cache_dir: str | None = None
    batch_size: int = 32
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    precision: str = "float32"
    jit_compile: bool = False


@dataclass(frozen=True)
class LevelsConfig:
    """The level rule as the config says it, in µm/px; `rule()` is the same rule in mm/px."""

    target_spacing_um: float = 0.5
    tolerance: float = 0.15
    mask_spacing_um: float = 5.0

    def rule(self) -> LevelRule:
        return LevelRule(self.target_spacing_um / 1000, self.tolerance, self.mask_spacing_um / 1000)


@dataclass(frozen=True)
class TissueConfig:
    v_min: int = 0
    v_max: int = 204
    min_tissue_fraction: float = 0.5


@dataclass(frozen=True)
class GridConfig:
    patch_size: int = 224
    chunk_size: int = 256


@dataclass(frozen=True)
class ColorConfig:
    icc_profile: str = "none"  # none | srgb (transforms.patches.ICC_PROFILES)

    def __post_init__(self) -> None:
        if self.icc_profile not in ICC_PROFILES:
            raise ValueError(f"color.icc_profile: one of {ICC_PROFILES}, not {self.icc_profile!r}")


@dataclass(frozen=True)
class ReadConfig:
    """How patch pixels are decoded (configs/local.yaml documents it)."""

    gpu_decode: str = "auto"  # auto | off (transforms.dicom_io.gpu_decode.MODES)
    # Levels at least ~2x finer than the ~20x target (40x sources) decoded at half resolution
    # in the codec (JPEG DCT scaling, JPEG 2000's finest wavelet level skipped) instead of
    # decoded whole and resized with INTER_AREA: faster, slightly different pixels. In the
    # parameter hash and metadata.json.
    reduced_decode: bool = False

    def __post_init__(self) -> None:
        if self.gpu_decode not in GPU_DECODE_MODES:
            raise ValueError(f"read.gpu_decode: one of {GPU_DECODE_MODES}, not {self.gpu_decode!r}")
        if not isinstance(self.reduced_decode, bool):
            raise ValueError(f"read.reduced_decode: true or false, not {self.reduced_decode!r}")


@dataclass(frozen=True)
class ThumbnailConfig:
    max_size: int = 1024
    jpeg_quality: int = 90


@dataclass(frozen=True)
class HashingConfig:
    # instance_pixeldata_SHA512_hash for "local" files only, or for "all" slides (remote ones
    # streamed once more: dicom_io/pixel_hash.py). Recorded in metadata.json; not part of the
    # parameter hash (it changes no embedding).
    pixeldata_sha512: str = "local"


@dataclass(frozen=True)
class RunConfig:
    uuids: tuple[str, ...] = ()
    force: bool = False
    idc_version: str | None = None
    # New-release mode: skip slides already in this resource table with an unchanged
    # instance hash (null = off; "auto" = {output_root}/tables/resource).
    resource_table: str | None = None
    # Stop the run (exit status 3) when more than this share of the slides tried failed
    # (null = never), once at least failure_check_min_slides were tried (transforms/failures.py).
    max_failed_fraction: float | None = 0.5
    failure_check_min_slides: int = 20
    # SkipDone checks the sizes of a complete slide's files against its marker; with this,
    # their SHA-256 checksums too (reads every file of every complete slide).
    verify_checksums: bool = False
    # One writer per slide (transforms/outputs/lease.py): a run holds a slide's lease from
    # SkipDone until it is written or failed; another run skips it meanwhile. A lease older
    # than this (a run that died on another machine) is taken over; on this machine a dead
    # process's lease is free at once.
    lease_ttl_s: float = 3600.0
    # How the driver shows progress while the job runs (pipeline/progress.py): auto (a bar on
    # a terminal, else log lines), bar, log or off; log lines every progress_interval seconds.
    progress: str = "auto"
    progress_interval: float = 30.0
    # Local runs: worker processes of Beam's FnApiRunner (1 = in process); 0 = the default, 1.
    # Each loads its own model; unset model.intra_op_threads becomes cores // workers.
    workers: int = 0


@dataclass(frozen=True)
class TablesConfig:
    """Where the resource, search and failures tables go (transforms/outputs/sinks.py)."""

    sink: str = "parquet"  # parquet | bigquery
    bigquery_dataset: str | None = None  # project.dataset
    resource: str = "pathology_embeddings_metadata"
    search: str = "path_foundation_500_embeddings"
    failures: str = "pathembed_failures"

    def validate(self) -> None:
        if self.sink not in ("parquet", "bigquery"):
            raise ValueError(f"tables.sink {self.sink!r}: parquet or bigquery")
        if self.sink == "bigquery" and not self.bigquery_dataset:
            raise ValueError("tables.sink bigquery needs tables.bigquery_dataset (project.dataset)")


@dataclass(frozen=True)
class DataflowConfig:
    """Dataflow job options (`pathembed launch`) and the embedding step's GPU resource hint."""

    project: str | None = None
    region: str = "us-central1"
    temp_location: str | None = None
    staging_location: str | None = None
    sdk_container_image: str | None = None
    machine_type: str = "n2-standard-4"
    max_num_workers: int = 100
    disk_size_gb: int = 50
    job_name: str = "pathembed"
    gpu_type: str | None = None  # e.g. nvidia-l4; null = no GPU hint (CPU everywhere)
    gpu_count: int = 1
    gpu_machine_type: str | None = None  # the embedding step's workers, e.g. g2-standard-16
    # Processes and models per worker (docs/cloud.md): one SDK process per worker instead of
    # one per core, that process's threads, and RunInference's model copies per worker
    # (shared by its processes; null = each process loads its own).
    single_sdk_process: bool = False
    harness_threads: int | None = None
    model_copies: int | None = None

    def embed_resource_hints(self) -> dict[str, str]:
        """Beam resource hints for the embedding step: a GPU when gpu_type is set, else none."""
        if not self.gpu_type:
            return {}
        parts = [f"type:{self.gpu_type}", f"count:{self.gpu_count}"]
        if self.gpu_machine_type:
            parts.append(f"machine_type:{self.gpu_machine_type}")
        return {"accelerator": ";".join([*parts, "install-nvidia-driver"])}


@dataclass(frozen=True)
class PipelineConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    output_root: str = "./pathembed_out"
    model: ModelConfig = field(default_factory=ModelConfig)
    levels: LevelsConfig = field(default_factory=LevelsConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    color: ColorConfig = field(default_factory=ColorConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    kmeans: KMeansParams = field(default_factory=KMeansParams)
    thumbnail: ThumbnailConfig = field(default_factory=ThumbnailConfig)
    hashing: HashingConfig = field(default_factory=HashingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tables: TablesConfig = field(default_factory=TablesConfig)
    dataflow: DataflowConfig = field(default_factory=DataflowConfig)

    def plan_params(self) -> PlanParams:
        return PlanParams(
            v_min=self.tissue.v_min,
            v_max=self.tissue.v_max,
            min_tissue_fraction=self.tissue.min_tissue_fraction,
            patch_size=self.grid.patch_size,
            chunk_size=self.grid.chunk_size,
            thumbnail_max_size=self.thumbnail.max_size,
            jpeg_quality=self.thumbnail.jpeg_quality,
            pixeldata_sha512=self.hashing.pixeldata_sha512,
            mask_spacing_mm=self.levels.rule().mask_spacing_mm,
        )

    def output_params(self, model_name: str, model_version: str) -> dict[str, Any]:
        """Everything that changes a slide's outputs; its hash decides if a slide is done."""
        return {
            "dataset_version": DATASET_VERSION,
            "model": {
                "name": model_name,
                "version": model_version,
                "precision": self.model.precision,
                "jit_compile": self.model.jit_compile,
            },
            "levels": dataclasses.asdict(self.levels),
            "tissue": dataclasses.asdict(self.tissue),
            "patch_size": self.grid.patch_size,
            "icc_profile": self.color.icc_profile,
            "reduced_decode": self.read.reduced_decode,
            "kmeans": self.kmeans.as_dict(),
        }


def parameter_hash(params: dict[str, Any]) -> str:
    """Short, stable hash of the output-defining parameters."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {where or 'top level'}")
    kwargs = {}
    for name, value in values.items():
        sub = known[name].default_factory
        if sub is not dataclasses.MISSING and dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{name} must be a mapping")
            kwargs[name] = _build(sub, value, f"{where}{name}.")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def set_overrides(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` flags as {"section.key": value}, values parsed as YAML (typed)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def config_from_flags(
    path: str | Path | None, set_items: list[str], flags: dict[str, Any]
) -> PipelineConfig:
    """The YAML config at `path` (None: the built-in defaults), then the `--set KEY=VALUE`
    items, then the command's named flags as {config key: value} (None: flag not given)."""
    overrides = set_overrides(set_items)
    overrides.update({key: value for key, value in flags.items() if value is not None})
    return load_config(path, overrides)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Loads a YAML config and applies `{"section.key": value}` overrides (typed values)."""
    values: dict[str, Any] = {}
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
    for dotted, value in (overrides or {}).items():
        node = values
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _build(PipelineConfig, values, "")
