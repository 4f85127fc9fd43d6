"""Benchmark of every pipeline stage on generated slides: one command, one table, one JSON.

    .venv/bin/python scripts/bench.py [--quick] [--json out.json] [--workdir DIR] [--seed-full]

Stages, each timed in this run on the project's sample slides (`medium-20x`, 2,732 patches at
20x; `small-40x`, 243 patches read at 40x and downsampled): tissue mask + grid, raw frame
decode, patch assembly (`read_patches`: frames -> 224 px uint8 patches, 40x -> 20x resize),
model calls (stub-tiny, stub-vit-s16; the SavedModel called directly vs Beam RunInference with
the project's handler), clustering (the default Lloyd's k-means vs the seed's MiniBatchKMeans on
20k and 100k x 384 embeddings: Gaussian clusters and stub-tiny embeddings of the samples),
artifact writing, then two end-to-end DirectRunner runs in child processes: medium-20x with
stub-tiny (seconds per stage), and a generated 100k-patch slide (20k with --quick) for peak
memory, with a cheap pooling model so it finishes in minutes, both in one process
(`--workers 1`); (`--only hashing`) the bytes read per slide with and without the PixelData
SHA-512 (hashing.pixeldata_sha512: all); (`--only scale`, scripts/bench_scale.py) runs of
8 to 64 slides: peak memory against the run's length, when the first slide is complete, and
`--workers 2` against `--workers 1`; (`--only decoders`, scripts/bench_decoders.py) JPEG and
JPEG 2000 decoders side by side and read.reduced_decode at 40x; and (`--only remote`,
scripts/bench_remote.py) patch assembly from gcp-storage-emulator behind a proxy that adds
50 ms per request vs from the local file, requests per chunk, and the requests that indexing
an instance without offset table takes.

Every timing is the best of a few interleaved rounds (other processes share the machine);
"per core" is items per CPU second of this process (all its threads). Ratios compare two
things measured in the same run. The seed's MiniBatchKMeans takes minutes per 20k embeddings on
2 cores (scikit-learn's k-means++ upcasts float32 data to float64 in small blocks, ten times),
so by default it runs on a random subsample (`--seed-n`) and Lloyd's is compared with it on
that same subsample; `--seed-full` runs it on the full 20k and 100k sets (an hour here).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pydicom  # noqa: E402
from pydicom.encaps import generate_frames  # noqa: E402

from scripts import bench_decoders, bench_remote, bench_scale, bench_slides  # noqa: E402
from transforms import clustering, patches, tissue  # noqa: E402
from transforms.dicom_io import byte_ranges, pixel_hash  # noqa: E402
from transforms.dicom_io.frames import FrameGrid  # noqa: E402
from transforms.plan import PlanParams, plan_slide  # noqa: E402
from transforms.records import SlideRecord  # noqa: E402
from transforms.samples.slides import write_samples  # noqa: E402
from transforms.sources.dicom_files import enumerate_dicom_folder  # noqa: E402

GIB = 1024**3
PARTS = (
    "mask",
    "assembly",
    "model",
    "clustering",
    "e2e",
    "memory",
    "hashing",
    "scale",
    "decoders",
    "remote",
)
PATCH = 224
DIM = 384
RSS_LIMIT = 4 * GIB
BATCH = 32
_STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Row:
    """One line of the table: `items` processed in `wall_s` seconds and `cpu_s` CPU seconds."""

    stage: str
    what: str
    items: int
    unit: str
    wall_s: float
    cpu_s: float | None = None
    note: str = ""

    @property
    def rate(self) -> float:
        return self.items / self.wall_s if self.wall_s else float("nan")

    @property
    def per_core(self) -> float | None:
        return self.items / self.cpu_s if self.cpu_s else None

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "rate_per_s": self.rate, "per_cpu_s": self.per_core}


@dataclasses.dataclass
class Ratio:
    name: str
    value: float
    target: str
    holds: bool
    note: str = ""


def best_of(rounds: int, *fns: Callable[[], Any]) -> list[tuple[float, float]]:
    """(best wall s, best CPU s) of each function, called in interleaved rounds."""
    walls = [[] for _ in fns]
    cpus = [[] for _ in fns]
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            walls[k].append(time.perf_counter() - wall)
            cpus[k].append(time.process_time() - cpu)
    return [(min(w), min(c)) for w, c in zip(walls, cpus, strict=True)]


# --- slides ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    record: SlideRecord
    coords: np.ndarray
    chunks: list


def sample_slides(workdir: pathlib.Path) -> dict[str, Sample]:
    folder = workdir / "slides"
    if not (folder / "medium-20x" / "level-0.dcm").exists():
        log("writing the sample slides (~30 s)")
        write_samples(folder, ["small-40x", "medium-20x"])
    out = {}
    for record in enumerate_dicom_folder(folder):
        plan = plan_slide(record, PlanParams())
        chunks = plan.chunks
        out[pathlib.Path(record.embedding_file).parent.name] = Sample(record, plan.coords, chunks)
    return out


def frames_needed(record: SlideRecord, coords: np.ndarray, level) -> list[int]:
    """0-based frame indexes the native footprints of these patches overlap."""
    d = record.levels.downsample
    native = round(PATCH * d)
    grid = FrameGrid.of(level)
    needed = set()
    for x, y in np.floor(coords * d).astype(int):
        x, y = min(x, level.width - native), min(y, level.height - native)
        needed.update(n - 1 for n in grid.region_numbers(x, y, native, native))
    return sorted(needed)


# --- stages ---------------------------------------------------------------------------------


def bench_mask_and_grid(sample: Sample, rounds: int) -> Row:
    record = sample.record

    def run() -> None:
        slide = patches.open_slide.__wrapped__(record.files)
        level = patches.level_of(slide, record.levels.mask.sop_instance_uid)
        mask = tissue.tissue_mask(patches.read_level_image(slide, level))
        tissue.patch_grid(mask, record.levels.source_width, record.levels.source_height)

    ((wall, cpu),) = best_of(rounds, run)
    cells = (record.levels.source_width // PATCH) * (record.levels.source_height // PATCH)
    return Row(
        "tissue mask + grid",
        "medium-20x (open, mask level, mask, grid)",
        cells,
        "grid cells",
        wall,
        cpu,
        f"{len(sample.coords)} kept",
    )


def bench_decode_and_assembly(name: str, sample: Sample, rounds: int) -> tuple[list[Row], dict]:
    """Raw decode of the frames the kept patches overlap vs assembling the patches from them."""
    from ez_wsi_dicomweb import dicom_frame_decoder

    record = sample.record
    ds = pydicom.dcmread(record.embedding_file)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    stored = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    del ds
    slide = patches.open_slide.__wrapped__(record.files)
    level = patches.level_of(slide, record.sop_instance_uid)
    blobs = [
        np.frombuffer(stored[k], np.uint8) for k in frames_needed(record, sample.coords, level)
    ]
    n, d = len(sample.coords), record.levels.downsample
    decodes = []

    def raw() -> None:
        for blob in blobs:
            cv2.imdecode(blob, cv2.IMREAD_COLOR)

    def ez_wsi() -> None:
        for blob in blobs:
            dicom_frame_decoder.decode_dicom_compressed_frame_bytes(blob.tobytes(), syntax)

    def assemble() -> None:
        fresh = patches.open_slide.__wrapped__(record.files)  # nothing read yet
        lv = patches.level_of(fresh, record.sop_instance_uid)
        cache = patches.FrameCache()
        for chunk in sample.chunks:
            patches.read_patches(fresh, lv, chunk.coords, d, PATCH, cache)
        decodes.append(cache.decodes)

    (raw_t, ez_t, asm_t) = best_of(rounds, raw, ez_wsi, assemble)
    if set(decodes) != {len(blobs)}:
        raise AssertionError(f"{name}: {decodes} decodes for {len(blobs)} frames")
    resize = " + 40x->20x INTER_AREA" if d != 1 else ""
    rows = [
        Row(
            "frame decode (raw)",
            f"{name}: cv2.imdecode, BGR",
            len(blobs),
            "frames",
            *raw_t,
            f"= {n / raw_t[0]:.0f} patches/s",
        ),
        Row(
            "frame decode (ez-wsi)",
            f"{name}: + BGR->RGB",
            len(blobs),
            "frames",
            *ez_t,
            f"= {n / ez_t[0]:.0f} patches/s",
        ),
        Row(
            "patch assembly",
            f"{name}: read_patches{resize}",
            n,
            "patches",
            *asm_t,
            f"{len(blobs)} frames, each decoded once",
        ),
    ]
    info = {
        "patches": n,
        "frames": len(blobs),
        "decodes": decodes[0],
        "vs_raw": raw_t[0] / asm_t[0],
        "vs_ez_wsi": ez_t[0] / asm_t[0],
    }
    return rows, info


def model_patches(sample: Sample, n: int) -> np.ndarray:
    slide = patches.open_slide(sample.record.files)
    level = patches.level_of(slide, sample.record.sop_instance_uid)
    out = []
    for chunk in sample.chunks:
        out.append(patches.read_patches(slide, level, chunk.coords, 1.0))
        if sum(map(len, out)) >= n:
            break
    return np.concatenate(out)[:n]


def _load_chunk(index: int, stored: str, chunk: int) -> tuple[str, np.ndarray]:
    pixels = np.load(stored, mmap_mode="r", allow_pickle=False)
    return f"chunk-{index}", np.array(pixels[index * chunk : (index + 1) * chunk])


def _record_exit(element: tuple) -> str:
    """Notes when a chunk leaves RunInference (microseconds, as a Beam metric)."""
    from apache_beam.metrics import Metrics

    Metrics.distribution("bench", "exit_us").update(time.time_ns() // 1000)
    return element[0]


def bench_model(
    name: str, pixels: np.ndarray, batch: int, chunk: int, cache_dir: pathlib.Path, rounds: int
) -> tuple[Row, Row, float, int]:
    """The SavedModel's signature called directly in a loop vs RunInference with the handler.

    Both embed the same chunks in calls of `batch` patches. RunInference's throughput is taken
    between the first and the last chunk leaving it (Beam's batching holds one chunk back until
    the next arrives, so a chunk's own latency would count another's work); the direct loop
    skips the first chunk the same way.
    """
    import apache_beam as beam
    import tensorflow as tf
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from models.handler import PathFoundationModelHandler
    from models.path_foundation import resolve_model

    chunks = [pixels[k : k + chunk] for k in range(0, len(pixels) - chunk + 1, chunk)]
    measured = sum(map(len, chunks[1:]))
    model_dir, _ = resolve_model(name, cache_dir)
    rss_before = psutil.Process().memory_info().rss
    fn = tf.saved_model.load(str(model_dir)).signatures["serving_default"]

    def direct() -> None:
        for pixels_ in chunks[1:]:
            for start in range(0, len(pixels_), batch):
                images = tf.constant(pixels_[start : start + batch].astype(np.float32) / 255.0)
                fn(inputs=images)["output_0"].numpy()

    fn(inputs=tf.constant(chunks[0][:batch].astype(np.float32) / 255.0))  # trace, warm up
    rss_model = psutil.Process().memory_info().rss - rss_before
    ((direct_wall, direct_cpu),) = best_of(rounds, direct)

    handler = PathFoundationModelHandler(name, cache_dir=cache_dir, batch_size=batch)
    # The chunks reach the pipeline through a file: beam.Create would pickle and bz2-compress
    # them into the pipeline graph, which takes minutes for a few hundred patches.
    with tempfile.TemporaryDirectory() as tmp:
        stored = pathlib.Path(tmp) / "pixels.npy"
        np.save(stored, pixels)
        runs = []
        for _ in range(rounds):
            p = beam.Pipeline(runner=FnApiRunner())
            _ = (
                p
                | beam.Create(range(len(chunks)), reshuffle=False)
                | beam.Map(_load_chunk, str(stored), chunk)
                | RunInference(KeyedModelHandler(handler))
                | beam.Map(_record_exit)
            )
            result = p.run()
            result.wait_until_finish()
            query = MetricsFilter().with_name("exit_us")
            [dist] = result.metrics().query(query)["distributions"]
            runs.append((dist.committed.max - dist.committed.min) / 1e6)
    beam_wall = min(runs)
    note = f"{measured} of {len(pixels)} patches timed; batch {batch}, chunks of {chunk}"
    row_direct = Row(
        "model call", f"{name}: SavedModel signature, direct loop", measured, "patches",
        direct_wall, direct_cpu, note,
    )  # fmt: skip
    row_beam = Row(
        "model call", f"{name}: RunInference + handler", measured, "patches", beam_wall, None,
        note,
    )  # fmt: skip
    return row_direct, row_beam, direct_wall / beam_wall, rss_model


# --- clustering -----------------------------------------------------------------------------


def gaussian_embeddings(n: int, seed: int = 0, clusters: int = 300) -> np.ndarray:
    """Clusters of uneven size and spread in 384 dimensions."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, DIM)).astype(np.float32)
    which = rng.choice(clusters, n, p=rng.dirichlet(np.full(clusters, 2.0)))
    spread = rng.uniform(0.3, 0.8, clusters).astype(np.float32)
    noise = rng.normal(size=(n, DIM)).astype(np.float32)
    return centers[which] + noise * spread[which, None]


def stub_embeddings(base: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n embeddings drawn from the samples' stub-tiny embeddings, each with noise of 10% of the
    per-dimension spread (the two samples hold 2,975 patches; embedding 100k patches with
    stub-tiny would take ~8 min here)."""
    rng = np.random.default_rng(seed)
    picked = base[rng.integers(0, len(base), n)]
    return picked + rng.normal(size=(n, DIM)).astype(np.float32) * (0.1 * base.std(axis=0))


def embed_samples(samples: dict[str, Sample], cache_dir: pathlib.Path) -> np.ndarray:
    from models.path_foundation import load_embedder, resolve_model

    embedder = load_embedder(resolve_model("stub-tiny", cache_dir)[0])
    out = []
    for sample in samples.values():
        slide = patches.open_slide(sample.record.files)
        level = patches.level_of(slide, sample.record.sop_instance_uid)
        for chunk in sample.chunks:
            pixels = patches.read_patches(
                slide, level, chunk.coords, sample.record.levels.downsample
            )
            out += [embedder(pixels[k : k + BATCH]) for k in range(0, len(pixels), BATCH)]
    return np.concatenate(out)


def run_clustering(x: np.ndarray, params: clustering.KMeansParams) -> tuple[float, float, float]:
    """(wall s, CPU s, inertia) of one clustering, seeded as the pipeline seeds a slide."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = clustering.cluster_embeddings(x, params, 12345)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, clustering.inertia_of(x, result.centroids)


def bench_clustering(
    datasets: dict[str, np.ndarray], seed_n: int, seed_full: bool
) -> tuple[list[Row], list[Ratio], list[dict]]:
    rows, ratios, records = [], [], []
    fast = clustering.KMeansParams()
    for name, x in datasets.items():
        log(f"clustering {name}: lloyd")
        wall, cpu, inertia = run_clustering(x, fast)
        rows.append(
            Row(
                "clustering",
                f"{name}: lloyd (default)",
                len(x),
                "embeddings",
                wall,
                cpu,
                f"inertia {inertia:.6g}",
            )
        )
        record = {"dataset": name, "n": len(x), "lloyd": [wall, cpu, inertia]}
        full = seed_full or len(x) <= seed_n
        sub = x if full else x[np.random.default_rng(1).choice(len(x), seed_n, replace=False)]
        label = name if full else f"{name}, random {seed_n} of them"
        if not full:
            log(f"clustering {label}: lloyd")
            s_wall, s_cpu, s_inertia = run_clustering(sub, fast)
            rows.append(
                Row(
                    "clustering",
                    f"{label}: lloyd (default)",
                    len(sub),
                    "embeddings",
                    s_wall,
                    s_cpu,
                    f"inertia {s_inertia:.6g}",
                )
            )
        else:
            s_wall, s_cpu, s_inertia = wall, cpu, inertia
        log(f"clustering {label}: seed MiniBatchKMeans (minutes)")
        m_wall, m_cpu, m_inertia = run_clustering(sub, clustering.SEED_PARAMS)
        rows.append(
            Row(
                "clustering",
                f"{label}: seed MiniBatchKMeans",
                len(sub),
                "embeddings",
                m_wall,
                m_cpu,
                f"inertia {m_inertia:.6g}",
            )
        )
        record["seed"] = {
            "n": len(sub),
            "seed": [m_wall, m_cpu, m_inertia],
            "lloyd": [s_wall, s_cpu, s_inertia],
        }
        records.append(record)
        ratios.append(
            Ratio(
                f"clustering speed, {label}: seed / lloyd wall time",
                m_wall / s_wall,
                ">= 10",
                m_wall / s_wall >= 10,
            )
        )
        ratios.append(
            Ratio(
                f"clustering inertia, {label}: lloyd / seed",
                s_inertia / m_inertia,
                "<= 1.005",
                s_inertia / m_inertia <= 1.005,
            )
        )
    return rows, ratios, records


# --- end to end in a child process ----------------------------------------------------------

_CHILD = """
import sys
from pipeline.cli import main
code = main(sys.argv[1:])
# VmHWM: this process's peak RSS since exec (ru_maxrss would include the parent's at fork)
with open("/proc/self/status") as status:
    peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
print("BENCH_MAXRSS_KB", peak, flush=True)
sys.exit(code)
"""
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def run_pipeline(
    input_dir: pathlib.Path,
    out: pathlib.Path,
    model: str,
    cache_dir: pathlib.Path,
    extra: list[str] = (),
) -> dict:
    """`pathembed run` in a child process: wall, CPU seconds (the run and its worker
    processes), peak RSS (of the run's process and of its whole process tree; per phase), the
    run's summary.

    In process (`--workers 1`) unless `extra` says otherwise: the per-phase log markers are
    those of that one process."""
    argv = [
        sys.executable,
        "-c",
        _CHILD,
        "run",
        "--input",
        str(input_dir),
        "--output-root",
        str(out),
        "--model",
        model,
        "--set",
        f"model.cache_dir={cache_dir}",
        "--workers",
        "1",
        *extra,
    ]
    samples: list[tuple[float, int]] = []
    started = time.time()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    done = threading.Event()

    def sample_rss() -> None:
        proc = psutil.Process(child.pid)
        while not done.is_set():
            try:
                tree = [proc, *proc.children(recursive=True)]
                samples.append((time.time(), sum(p.memory_info().rss for p in tree)))
            except psutil.NoSuchProcess as gone:
                if gone.pid == proc.pid:
                    break  # the run ended (a worker that ended is sampled again next time)
            done.wait(0.05)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    stdout, stderr = child.communicate()
    done.set()
    sampler.join()
    wall = time.time() - started
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped: the run and its workers
    cpu_s = cpu.ru_utime + cpu.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    if child.returncode != 0:
        raise RuntimeError(f"pathembed run failed ({child.returncode}):\n{stderr[-3000:]}")
    max_rss = int(re.search(r"BENCH_MAXRSS_KB (\d+)", stdout).group(1)) * 1024
    events = {}
    for line in stderr.splitlines():
        stamp = _LOG_TIME.match(line)
        for event, marker in (
            ("planned", " planned "),
            ("embedded", " embedded "),
            ("written", " wrote "),
        ):
            if stamp and marker in line and event not in events:
                events[event] = datetime.datetime.strptime(
                    stamp.group(1), "%Y-%m-%d %H:%M:%S,%f"
                ).timestamp()
    bounds = [started, events.get("planned"), events.get("embedded"), time.time()]
    phases = {}
    for name, lo, hi in zip(
        ("plan", "read + embed", "cluster + write"), bounds, bounds[1:], strict=False
    ):
        if lo is not None and hi is not None:
            in_phase = [rss for t, rss in samples if lo <= t <= hi]
            phases[name] = max(in_phase) if in_phase else None
    [summary_file] = sorted((out / "runs").glob("*.json"))[-1:]
    summary = json.loads(summary_file.read_text())
    return {
        "wall_s": wall,
        "cpu_s": cpu_s,
        "max_rss": max_rss,
        "peak_rss_tree": max((rss for _, rss in samples), default=max_rss),
        "phase_max_rss": phases,
        **summary,
    }


def pooling_model(directory: pathlib.Path) -> pathlib.Path:
    """A SavedModel with Path Foundation's signature that projects every 16th pixel (thousands
    of patches/s on CPU), labelled as a stand-in: the memory run's model."""
    import tensorflow as tf

    from models import signature, stubs

    if (directory / "saved_model.pb").exists():
        return directory

    class Pool(tf.Module):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.w = tf.Variable(rng.normal(size=(14 * 14 * 3, DIM)).astype(np.float32))

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, PATCH, PATCH, 3], tf.float32, name=signature.INPUT_NAME)
            ]
        )
        def serve(self, inputs: tf.Tensor) -> dict:
            pixels = inputs[:, ::16, ::16, :]
            return {signature.OUTPUT_KEY: tf.reshape(pixels, [-1, 14 * 14 * 3]) @ self.w}

    module = Pool()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
    marker = {
        "name": "bench-pool",
        "version": "bench-pool-v1 (pixel projection; NOT Path Foundation)",
    }
    (directory / stubs.MARKER_PATH).parent.mkdir(exist_ok=True)
    (directory / stubs.MARKER_PATH).write_text(json.dumps(marker))
    return directory


# --- report ---------------------------------------------------------------------------------


def fmt_rate(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def table(rows: list[Row]) -> str:
    header = (
        f"{'stage':<22} {'what':<58} {'items':>8} {'wall s':>8} {'per s':>9} {'per CPU s':>9}  note"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.stage:<22} {r.what[:58]:<58} {r.items:>8} {r.wall_s:>8.2f} "
            f"{fmt_rate(r.rate):>9} {fmt_rate(r.per_core):>9}  {r.unit}; {r.note}"
        )
    return "\n".join(lines)


def machine() -> dict:
    import sklearn
    import tensorflow as tf

    return {
        "cpus": os.cpu_count(),
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        ),
        "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "tensorflow": tf.__version__,
        "opencv": cv2.__version__,
    }


def part_clustering(
    samples: dict, cache_dir: pathlib.Path, sizes: list[int], seed_n: int, seed_full: bool
) -> tuple[list[Row], list[Ratio], Any]:
    """Lloyd's vs the seed's MiniBatchKMeans on 20k and 100k x 384 embeddings."""
    log("stub-tiny embeddings of the samples")
    base = embed_samples(samples, cache_dir)
    datasets = {}
    for n in sizes:
        datasets[f"gaussian {n // 1000}k"] = gaussian_embeddings(n)
        datasets[f"stub-tiny {n // 1000}k"] = stub_embeddings(base, n)
    return bench_clustering(datasets, seed_n, seed_full)


def run_rows(run: dict, label: str, what: str, whole_what: str) -> list[Row]:
    """Table rows of a `run_pipeline` result: seconds per stage, then the whole run."""
    embedded = run["counters"]["patches_embedded"]
    rows = []
    for stage, secs in run["stage_seconds"].items():
        slides = stage in ("plan", "cluster", "write")
        unit, items = ("slides", 1) if slides else ("patches", embedded)
        rows.append(Row(f"{label}: {stage}", what, items, unit, secs))
    peak = f"peak RSS {run['max_rss'] / GIB:.2f} GiB"
    rows.append(
        Row(f"{label}: whole run", whole_what, embedded, "patches", run["wall_s"], None, peak)
    )
    return rows


def part_e2e(workdir: pathlib.Path, cache_dir: pathlib.Path) -> tuple[list[Row], list[Ratio], Any]:
    """`pathembed run` on medium-20x with stub-tiny: seconds per stage."""
    log("end to end: medium-20x, stub-tiny, DirectRunner")
    e2e_input = workdir / "e2e-input"
    e2e_input.mkdir(exist_ok=True)
    if not (e2e_input / "medium-20x").exists():
        (e2e_input / "medium-20x").symlink_to(workdir / "slides" / "medium-20x")
    e2e = run_pipeline(e2e_input, workdir / f"e2e-out-{time.time_ns()}", "stub-tiny", cache_dir)
    what = "medium-20x, stub-tiny, DirectRunner"
    return run_rows(e2e, "e2e", what, what), [], e2e


def part_memory(
    workdir: pathlib.Path, cache_dir: pathlib.Path, quick: bool, model_rss: dict
) -> tuple[list[Row], list[Ratio], Any]:
    """`pathembed run` on a generated 100k-patch slide: peak RSS of the worker process."""
    big_n = 20000 if quick else 100000
    log(f"memory: a {big_n}-patch slide, DirectRunner")
    big_dir = workdir / f"big-{big_n}"
    if not (big_dir / f"bench-{big_n}" / "level-0.dcm").exists():
        frames = bench_slides.tissue_frames(workdir / "slides" / "medium-20x" / "level-0.dcm", 2000)
        bench_slides.write_large_slide(big_dir, big_n, frames)
    size = sum(p.stat().st_size for p in big_dir.rglob("*.dcm"))
    pool_dir = pooling_model(workdir / "models" / "bench-pool")
    big = run_pipeline(big_dir, workdir / f"big-out-{time.time_ns()}", str(pool_dir), cache_dir)
    big_embedded = big["counters"]["patches_embedded"]
    rows = run_rows(
        big, f"{big_n // 1000}k slide", "pooling model, DirectRunner",
        f"{size / GIB:.2f} GiB of DICOM",
    )  # fmt: skip
    vit_extra = model_rss.get("stub-vit-s16", 0)
    phases = ", ".join(f"{k} {v / GIB:.2f}" for k, v in big["phase_max_rss"].items() if v)
    ratio = Ratio(
        f"peak RSS of a worker, {big_n // 1000}k-patch slide (GiB)",
        big["max_rss"] / GIB,
        "< 4",
        big["max_rss"] < RSS_LIMIT,
        f"peak per phase, GiB: {phases}; with stub-vit-s16 loaded instead of the pooling "
        f"model (+{vit_extra / GIB:.2f}): {(big['max_rss'] + vit_extra) / GIB:.2f}",
    )
    return rows, [ratio], {"patches": big_embedded, "dicom_bytes": size, **big}


def hashing_bytes(record: SlideRecord, coords: np.ndarray) -> dict[str, int]:
    """Bytes a worker reads from the store for one slide, without and with the PixelData
    SHA-512 (hashing.pixeldata_sha512: all), counted by the byte-range reader the remote
    sources use (a local file read the same way stands in for the bucket object):
    without = the mask level plus every frame under the planned patches; the hash adds one
    sequential pass over the embedding level's header and PixelData value."""
    slide = byte_ranges.open_range_slide([uri for _, uri in record.files])
    mask = patches.level_of(slide, record.levels.mask.sop_instance_uid)
    patches.read_level_image(slide, mask)
    level = patches.level_of(slide, record.sop_instance_uid)
    patches.read_patches(slide, level, coords, record.levels.downsample, PATCH)
    without = slide.io.bytes
    _, hashed = pixel_hash.sha512_from_uri(record.embedding_file)
    return {
        "without": without,
        "with": without + hashed,
        "hash_pass": hashed,
        "embedding_instance": os.path.getsize(record.embedding_file),
    }


def part_hashing(samples: dict[str, Sample]) -> tuple[list[Ratio], dict]:
    ratios, records = [], {}
    for name, sample in samples.items():
        log(f"bytes read with and without the PixelData SHA-512: {name}")
        counted = records[name] = hashing_bytes(sample.record, sample.coords)
        ratios.append(
            Ratio(
                f"bytes read per slide with / without pixeldata SHA-512, {name}",
                counted["with"] / counted["without"],
                "(info)",
                True,
                f"{counted['without'] / 1e6:.1f} MB without, {counted['with'] / 1e6:.1f} MB "
                f"with (the hash reads {counted['hash_pass'] / 1e6:.1f} MB; embedding-level "
                f"instance {counted['embedding_instance'] / 1e6:.1f} MB)",
            )
        )
    return ratios, records


def part_remote(
    sample: Sample, workdir: pathlib.Path, rounds: int
) -> tuple[list[Row], list[Ratio], dict]:
    """Patch assembly from a bucket 50 ms away vs a local file (scripts/bench_remote.py)."""
    log("remote: medium-20x from gcp-storage-emulator behind a 50 ms proxy vs local")
    info = bench_remote.bench_remote(sample.record, sample.chunks, workdir, rounds)
    rows = []
    for label, r in [
        ("local file", info["local"]),
        ("gs:// +50 ms, ranges one by one", info["remote_one_by_one"]),
    ] + [(f"gs:// +50 ms, gap {int(g) // 1024} KiB", r) for g, r in info["remote_by_gap"].items()]:
        rows.append(
            Row(
                "patch assembly",
                f"medium-20x, {label}",
                r["patches"],
                "patches",
                r["wall_s"],
                r["cpu_s"],
                f"{r['requests'] / r['chunks']:.1f} requests/chunk, "
                f"{r['bytes'] / r['chunks'] / 2**20:.2f} MiB/chunk",
            )
        )
    reader = info["reader"]
    for label, key in [
        ("local file", "local"),
        (f"gs:// +50 ms, fetch lead {reader['fetch_lead']}", "remote"),
        ("gs:// +50 ms, no fetch lead", "remote_no_lead"),
    ]:
        r = reader[key]
        rows.append(
            Row(
                "EmbedSlide reading (embed_plan, no model)",
                f"medium-20x, {label}",
                r["patches"],
                "patches",
                r["wall_s"],
                r["cpu_s"],
                f"{r['requests'] / r['chunks']:.1f} requests/chunk",
            )
        )
    idx = info["index_no_offset_table"]
    ratios = [
        Ratio(
            "patches/s, gs:// +50 ms per request / local file, as EmbedSlide reads a slide",
            reader["ratio"],
            ">= 0.7",
            reader["ratio"] >= 0.7,
            f"stages.embed_plan with no model; {reader['ratio_no_lead']:.2f} with no fetch lead",
        ),
        *(
            Ratio(
                f"CPU ms of this process per 160 KB range request, 8 threads, {client}",
                ms,
                "(info)",
                True,
                "against the emulator, no proxy; range_get is what the reader uses",
            )
            for client, ms in info["client_cpu_ms_per_request"].items()
        ),
        Ratio(
            "patches/s, gs:// +50 ms / local file, chunks assembled one at a time",
            info["ratio"],
            "(info)",
            True,
            f"{info['requests_per_chunk']:.1f} requests per chunk, gap "
            f"{info['default_gap'] // 1024} KiB; each chunk waits a round trip",
        ),
        Ratio(
            "requests to index an instance without offset table",
            idx["requests"],
            f"<= size / 8 MiB + 2 = {idx['bound']:.1f}",
            idx["requests"] <= idx["bound"] and idx["requests_again_same_process"] == 0,
            f"{idx['frames']} frames; again in the same process: "
            f"{idx['requests_again_same_process']}; one per frame would be "
            f"{idx['per_frame_walk_requests']}",
        ),
    ]
    for line in bench_remote.summary_lines(info):
        log(line)
    return rows, ratios, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a faster subset (~4 min)")
    parser.add_argument("--json", type=pathlib.Path, help="write the results here too")
    parser.add_argument(
        "--workdir",
        type=pathlib.Path,
        help="keep slides and models here between runs (default: a temp dir)",
    )
    parser.add_argument(
        "--seed-n",
        type=int,
        help="embeddings the seed's MiniBatchKMeans runs "
        "on (a random subsample; default 3000, 2000 with --quick)",
    )
    parser.add_argument(
        "--seed-full",
        action="store_true",
        help="run the seed's MiniBatchKMeans on the full 20k/100k sets (slow)",
    )
    parser.add_argument(
        "--sizes",
        type=lambda v: [int(n) for n in v.split(",")],
        help="embeddings per clustering dataset, comma-separated (default 20000,100000; "
        "20000 with --quick)",
    )
    parser.add_argument(
        "--only",
        help=f"comma-separated parts to run (default: all): {', '.join(PARTS)}",
    )
    args = parser.parse_args(argv)
    parts = set(PARTS if not args.only else args.only.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown part(s) {sorted(parts - set(PARTS))}; choose from {PARTS}")
    quick = args.quick
    rounds = 2 if quick else 3
    seed_n = args.seed_n or (2000 if quick else 3000)
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="pathembed-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cache_dir = workdir / "models"
    info = {
        "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "quick": quick,
    }
    rows: list[Row] = []
    ratios: list[Ratio] = []

    log(f"workdir {workdir}")
    samples = sample_slides(workdir) if parts - {"decoders"} else {}
    if "mask" in parts:
        rows.append(bench_mask_and_grid(samples["medium-20x"], rounds))

    assembly = {}
    for name in ("medium-20x", "small-40x") if "assembly" in parts else ():
        log(f"frame decode and patch assembly: {name}")
        new_rows, assembly[name] = bench_decode_and_assembly(name, samples[name], rounds)
        rows += new_rows
        value = assembly[name]["vs_raw"]
        ratios.append(
            Ratio(
                f"patch assembly / raw cv2 decode, {name} (patches/s)",
                value,
                ">= 0.7",
                value >= 0.7,
                f"vs ez-wsi's decode (with BGR->RGB): {assembly[name]['vs_ez_wsi']:.2f}",
            )
        )

    model_runs = {  # name: (patches, batch, chunk); the first chunk warms up
        "stub-tiny": (3 * 256, BATCH, 256),
        "stub-vit-s16": (3 * 8, 8, 8) if quick else (4 * 16, 16, 16),
    }
    pixels = model_patches(samples["medium-20x"], 3 * 256) if "model" in parts else None
    model_rss = {}
    for name, (n, batch, chunk) in model_runs.items() if "model" in parts else ():
        log(f"model {name}: {n} patches")
        row_direct, row_beam, ratio, model_rss[name] = bench_model(
            name, pixels[:n], batch, chunk, cache_dir, 1 if name == "stub-vit-s16" else rounds
        )
        rows += [row_direct, row_beam]
        target = name == "stub-vit-s16"
        ratios.append(
            Ratio(
                f"RunInference / direct SavedModel loop, {name} (patches/s)",
                ratio,
                ">= 0.9" if target else "(info)",
                ratio >= 0.9 or not target,
            )
        )

    c_records = e2e = large = None
    if "clustering" in parts:
        sizes = args.sizes or ([20000] if quick else [20000, 100000])
        new_rows, new_ratios, c_records = part_clustering(
            samples, cache_dir, sizes, seed_n, args.seed_full
        )
        rows, ratios = rows + new_rows, ratios + new_ratios
    if "e2e" in parts:
        new_rows, new_ratios, e2e = part_e2e(workdir, cache_dir)
        rows, ratios = rows + new_rows, ratios + new_ratios
    if "memory" in parts:
        new_rows, new_ratios, large = part_memory(workdir, cache_dir, quick, model_rss)
        rows, ratios = rows + new_rows, ratios + new_ratios
    scale = None
    if "scale" in parts:
        log("scale: runs of 8 to 64 slides (memory, first slide, workers)")
        frames = bench_slides.tissue_frames(workdir / "slides" / "medium-20x" / "level-0.dcm", 200)
        model = pooling_model(workdir / "models" / "bench-pool")
        scale_rows, scale_ratios, scale = bench_scale.part_scale(
            workdir, cache_dir, model, frames, run_pipeline
        )
        for r in scale_rows:
            rows.append(
                Row("scale", r["what"], round(r["patches_per_s"] * r["wall_s"]), "patches",
                    r["wall_s"], note=f"peak RSS {r['peak_rss_gib']:.2f} GiB, first slide "
                    f"complete at {r['first_complete_s']:.1f} s, {r['cores_used']:.2f} cores busy")
            )  # fmt: skip
        ratios += [Ratio(*ratio) for ratio in scale_ratios]

    hashing = None
    if "hashing" in parts:
        new_ratios, hashing = part_hashing(samples)
        ratios += new_ratios

    decoders = None
    if "decoders" in parts:
        new_rows, new_ratios, decoders = bench_decoders.part_decoders(
            workdir, cache_dir, rounds, Row, Ratio, log
        )
        rows, ratios = rows + new_rows, ratios + new_ratios

    remote = None
    if "remote" in parts:
        new_rows, new_ratios, remote = part_remote(samples["medium-20x"], workdir, rounds + 2)
        rows, ratios = rows + new_rows, ratios + new_ratios

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total = time.perf_counter() - _STARTED
    print()
    print(
        f"pathembed benchmark ({'quick' if quick else 'full'}), {total:.0f} s, "
        f"{info['machine']['cpus']} CPUs ({info['machine']['cpu_model']}), load average at "
        f"start {info['machine']['load_average_at_start'][0]:.2f}; this process peak RSS "
        f"{peak / GIB:.2f} GiB"
    )
    print(table(rows))
    print()
    print("ratios (measured in this run)")
    for r in ratios:
        verdict = "holds" if r.holds else "DOES NOT HOLD"
        print(
            f"  {r.name}: {r.value:.3f} (target {r.target}) {verdict}"
            + (f"  [{r.note}]" if r.note else "")
        )
    if args.json:
        document = {
            **info,
            "total_s": total,
            "bench_peak_rss": peak,
            "rows": [r.as_dict() for r in rows],
            "ratios": [dataclasses.asdict(r) for r in ratios],
            "assembly": assembly,
            "model_rss": model_rss,
            "clustering": c_records,
            "e2e": e2e,
            "large_slide": large,
            "hashing_bytes": hashing,
            "decoders": decoders,
            "scale": scale,
            "remote": remote,
        }
        args.json.write_text(json.dumps(document, indent=1, default=float))
        print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
