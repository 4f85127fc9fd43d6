"""`pathembed rerun`: run again exactly the slides of a failures table.

The slides are the distinct instance UUIDs of the failure rows (all runs, or `--run-id`; all
reason codes, or `--reason`), and the run is `pathembed run --uuids ...` with the same source
flags as the run that failed. Slides that have been completed since (completion marker with this
run's parameter hash) are skipped unless `--force`, so rerunning an old failures table is safe.
"""

from __future__ import annotations

import argparse
import logging

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
