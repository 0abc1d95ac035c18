"""Rebuild the cohort report: ``python -m qsmdask.report OUTPUT_DIR [BIDS_DIR]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .html import build_cohort_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsmdask.report",
                                description="Write OUTPUT_DIR/report.html from a qsmdask run.")
    p.add_argument("output_dir", type=Path, help="qsmdask derivatives folder")
    p.add_argument("bids_dir", type=Path, nargs="?", default=None,
                   help="BIDS dataset (default: the one recorded in logs/qsmdask_config.json)")
    args = p.parse_args(argv)
    try:
        path = build_cohort_report(args.output_dir, args.bids_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
