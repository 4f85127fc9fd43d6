"""The full-archive Dataflow job, built but never submitted: Beam's own DataflowRunner dry run
(--dry_run=True) translates the pipeline from configs/idc.yaml into the Dataflow job (Docker
environments with resource hints) without credentials or network.

The model is a stand-in here: google/path-foundation would be fetched from Hugging Face."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import launch
from pipeline.cli import main
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ACCELERATOR = "beam:resources:accelerator:v1"
TOP_LEVEL = [
    "Enumerate", "CountFound", "SpreadSlides", "SkipDone", "CountTodo", "WriteTodo",
    "SpreadTodo", "PlanSlide", "EmbedSlide", "ClusterSlide", "WriteSlide",
    "EnumerateFailures", "EnumerateBreaker", "PlanFailures", "PlanBreaker",
    "ReadFailures", "ReadBreaker", "EmbedFailures", "EmbedBreaker",
    "ClusterFailures", "ClusterBreaker",
    "WriteFailures", "WriteBreaker", "AllFailures", "WriteFailureRows",
]  # fmt: skip
GROUP_BY_KEY = "beam:transform:group_by_key:v1"


@pytest.fixture(scope="module")
def production(tmp_path_factory):
    """(config, the Dataflow job's pipeline proto) for configs/idc.yaml."""
    cache = tmp_path_factory.mktemp("launch-models")
    cfg = load_config(
        ROOT / "configs" / "idc.yaml", {"model.name": "stub-tiny", "model.cache_dir": str(cache)}
    )
    beam_args = [*launch.dataflow_options(cfg.dataflow), "--dry_run=True"]
    pipeline, _ = launch.build_pipeline(cfg, beam_args, "20260101T000000Z-abcdef")
    job = launch.dry_run_job(pipeline)
    return cfg, job.proto_pipeline


def test_the_production_graph_reads_bigquery_and_writes_gcs_and_bigquery(production):
    cfg, proto = production
    assert cfg.source.kind == "bigquery" and cfg.output_root.startswith("gs://")
    names = [t.unique_name for depth, t in launch.walk_transforms(proto) if depth == 0]
    assert names == TOP_LEVEL
    every = {t.unique_name for _, t in launch.walk_transforms(proto)}
    assert "Enumerate/RunQuery" in every  # the BigQuery source (transforms/sql/idc_slides.sql)
    # Rows go to per-slide files under the gs:// root, loaded into BigQuery after the job
    # (transforms/outputs/bigquery_sink.py merge_run), not by a load at the end of the job.
    assert not any("WriteToBigQuery" in n or "BigQueryBatchFileLoads" in n for n in every)


def _producers(proto) -> dict[str, str]:
    """{pcollection id: unique name of the top-level transform that outputs it}."""
    produced = {}
    for depth, t in launch.walk_transforms(proto):
        if depth == 0:
            produced.update({pc: t.unique_name for pc in t.outputs.values()})
    return produced


def test_the_production_graph_spreads_slides_before_planning_and_has_no_run_wide_barrier(
    production,
):
    """Enumeration -> Reshuffle -> SkipDone -> Reshuffle -> PlanSlide, and no GroupByKey after
    planning: the only grouping steps are the two reshuffles and the todo count, so every slide
    is written (and its rows committed) while others are still being embedded."""
    _, proto = production
    top = {t.unique_name: t for depth, t in launch.walk_transforms(proto) if depth == 0}
    produced = _producers(proto)

    def upstream(name: str) -> str:
        (pcoll,) = top[name].inputs.values()
        return produced[pcoll]

    assert upstream("PlanSlide") == "SpreadTodo" and upstream("SpreadTodo") == "SkipDone"
    assert upstream("SkipDone") == "SpreadSlides"
    assert upstream("SpreadSlides") == "CountFound" and upstream("CountFound") == "Enumerate"
    assert upstream("EmbedSlide") == "PlanSlide" and upstream("ClusterSlide") == "EmbedSlide"
    assert upstream("WriteSlide") == "ClusterSlide"
    grouping = {
        t.unique_name.split("/")[0]
        for _, t in launch.walk_transforms(proto)
        if t.spec.urn == GROUP_BY_KEY
    }
    assert grouping == {"SpreadSlides", "SpreadTodo", "CountTodo"}, grouping


def test_the_gpu_hint_is_on_the_embedding_step_only(production):
    cfg, proto = production
    hints = launch.resource_hints_by_transform(proto)
    gpu = {name for name, h in hints.items() if ACCELERATOR in h}
    embed = {name for name in hints if name == "EmbedSlide" or name.startswith("EmbedSlide/")}
    assert gpu == embed
    assert "EmbedSlide/RunInference" in gpu  # reads and embeds: pixels never leave the step
    expected = "type:nvidia-l4;count:1;machine_type:g2-standard-16;install-nvidia-driver"
    assert {hints[name][ACCELERATOR] for name in gpu} == {expected}
    assert cfg.dataflow.embed_resource_hints() == {"accelerator": expected}
    # Two worker environments, both the configured image: the GPU one and the default.
    text = launch.render_environments(proto)
    assert text.count(cfg.dataflow.sdk_container_image) == len(proto.components.environments) == 2
    assert text.count(expected) == 1


def test_launch_dry_run_prints_options_and_the_graph(tmp_path, capsys):
    dot = tmp_path / "job.dot"
    code = main([
        "launch", "--dry-run", "--model", "stub-tiny", "--set", f"model.cache_dir={tmp_path}",
        "--project", "other-project", "--temp-location", "gs://other-bucket/tmp",
        "--image", "example.org/pathembed:test", "--gpu-type", "nvidia-tesla-t4",
        "--gpu-count", "2", "--gpu-machine-type", "n1-standard-16", "--max-workers", "7",
        "--graph-out", str(dot),
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    for option in ('"project": "other-project"', '"temp_location": "gs://other-bucket/tmp"',
                   '"sdk_container_image": "example.org/pathembed:test"',
                   '"max_num_workers": 7', '"runner": "DataflowRunner"', '"dry_run": "True"',
                   '"sdk_location": "container"'):  # fmt: skip
        assert option in out, option
    hint = "type:nvidia-tesla-t4;count:2;machine_type:n1-standard-16;install-nvidia-driver"
    assert f"EmbedSlide  [accelerator={hint}]" in out
    assert "\nClusterSlide\n" in out and "dry run: nothing submitted" in out
    graph = dot.read_text()
    assert graph.startswith("digraph pathembed {")
    assert '"PlanSlide" -> "EmbedSlide";' in graph and '"EmbedSlide" -> "ClusterSlide";' in graph
    assert graph.count("fillcolor") == 1  # only EmbedSlide is drawn as a GPU step


def test_no_gpu_type_means_no_hint_anywhere(tmp_path):
    cfg = load_config(
        ROOT / "configs" / "idc.yaml",
        {"dataflow.gpu_type": None, "model.name": "stub-tiny", "model.cache_dir": str(tmp_path)},
    )
    pipeline, _ = launch.build_pipeline(
        cfg, [*launch.dataflow_options(cfg.dataflow), "--dry_run=True"], "r"
    )
    hints = launch.resource_hints_by_transform(pipeline.to_runner_api())
    assert not any(ACCELERATOR in h for h in hints.values())


def test_launch_says_what_a_dataflow_job_still_needs(tmp_path):
    with pytest.raises(SystemExit, match=r"worker image.*gs:// output root") as caught:
        main([
            "launch", "--dry-run", "--output-root", str(tmp_path), "--set",
            "dataflow.sdk_container_image=null",
        ])  # fmt: skip
    assert "project" not in str(caught.value)  # idc.yaml names one


def test_every_launch_flag_is_documented(capsys):
    with pytest.raises(SystemExit):
        main(["launch", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--project", "--region", "--temp-location", "--staging-location", "--image",
                 "--machine-type", "--gpu-type", "--gpu-count", "--gpu-machine-type",
                 "--max-workers", "--dry-run", "--graph-out", "--merge-only"):  # fmt: skip
        assert flag in out, flag
    for key in launch._CONFIG_FLAGS.values():
        assert f"({key}" in out, key
