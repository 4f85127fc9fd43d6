"""`pathembed failures` and `pathembed rerun`: see why slides failed, and run exactly those
slides again.

The slides are the distinct instance UUIDs of the failure rows (all runs, or `--run-id`; all
reason codes, or `--reason`), and the run is `pathembed run --uuids ...` with the same source
flags as the run that failed. Slides that have been completed since (completion marker with this
run's parameter hash) are skipped unless `--force`, so rerunning an old failures table is safe.
"""

from __future__ import annotations

import argparse
import logging

from transforms.urls import for_terminal

_LOG = logging.getLogger("pathembed")


def add_rerun_parser(sub: argparse._SubParsersAction) -> None:
    from pipeline.cli import add_run_arguments

    rerun = sub.add_parser(
        "rerun",
        help="run again the slides of a failures table",
        description="Runs the slides named by a failures table again, with the same source "
        "flags as the run that failed (e.g. --input DIR, or --source manifest --input F). "
        "Other flags are those of `run`, and Beam's.",
    )
    rerun.add_argument(
        "--failures",
        required=True,
        help="failures table: Parquet file or folder ({output_root}/tables/failures) or "
        "BigQuery project.dataset.table",
    )
    rerun.add_argument("--run-id", help="only the failures of this run")
    rerun.add_argument(
        "--reason", action="append", default=[], help="only these reason codes (repeatable)"
    )
    add_run_arguments(rerun)
    rerun.set_defaults(handler=rerun_command, passes_beam_flags=True)


def rerun_command(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipeline.cli import run_command
    from transforms.reruns import failed_slides

    if args.uuids or args.uuids_file:
        raise SystemExit("rerun takes its slides from --failures; drop --uuids / --uuids-file")
    try:
        failed = failed_slides(args.failures, args.run_id, args.reason)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--failures {args.failures}: {exc}") from None
    if failed.rejected:
        print(f"not rerun (not UUIDs): {', '.join(repr(v) for v in failed.rejected)}")
    if not failed.uuids:
        print(f"no slides to rerun in {args.failures}")
        return 0
    _LOG.info("rerunning %d failed slides from %s", len(failed.uuids), args.failures)
    args.uuids = ",".join(failed.uuids)
    return run_command(args, beam_args)


def add_failures_parser(sub: argparse._SubParsersAction) -> None:
    failures = sub.add_parser(
        "failures",
        help="summarise a failures table: counts per reason code and stage, one line per row",
    )
    failures.add_argument("table", help="Parquet file or folder, e.g. OUT/tables/failures")
    failures.add_argument("--run-id", help="only the failures of this run")
    failures.add_argument("--reason", action="append", default=[], help="only these reason codes")
    failures.set_defaults(handler=failures_command)


def failures_command(args: argparse.Namespace, _: list[str]) -> int:
    from collections import Counter

    from transforms.reruns import local_failure_rows

    try:
        rows = local_failure_rows(args.table, args.run_id, args.reason)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{args.table}: {exc}") from None
    # Every value comes from a table a run (or anyone with write access) filled from slide
    # headers: escaped and redacted before it reaches the terminal.
    shown = [{k: for_terminal(str(v)) for k, v in r.items()} for r in rows]
    slides = {r["instance_uuid"] for r in rows}
    print(f"{len(rows)} failure rows, {len(slides)} slides")
    for (reason, stage), n in sorted(
        Counter((r["reason_code"], r["stage"]) for r in shown).items()
    ):
        print(f"  {reason:<30} {stage:<10} {n}")
    for r in shown:
        print(f"{r['instance_uuid']}  {r['stage']:<9} {r['reason_code']:<28} {r['message']}")
    return 0
