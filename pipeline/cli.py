"""`pathembed`: the command line root. It only registers the subcommands; each lives in its
module (run.py: run, rerun, failures, sample; search_cli.py: search, index, lookup, fetch,
show; launch.py: launch). Nothing imports this module."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline import launch, run, search_cli
from transforms import urls

# Each adds one subcommand parser whose defaults set `handler(args, extra_flags) -> exit code`.
SUBCOMMANDS = [
    run.add_run_parser,
    run.add_rerun_parser,
    run.add_failures_parser,
    run.add_sample_parser,
    search_cli.add_search_parser,
    search_cli.add_index_parser,
    search_cli.add_lookup_parser,
    search_cli.add_fetch_parser,
    search_cli.add_show_parser,
    launch.add_launch_parser,
]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(
        prog="pathembed",
        description="Path Foundation embeddings for DICOM whole-slide images (IDC or your own).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(sub)
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_beam_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # No URL user-info or signature, and no raw control character, reaches the log.
    urls.install_log_redaction()
    # Beam logs every string type hint (from `from __future__ import annotations`) at INFO.
    logging.getLogger("apache_beam.typehints.native_type_compatibility").setLevel(logging.WARNING)
    return args.handler(args, rest)
