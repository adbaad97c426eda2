"""Official DCASE Task 2 score of a folder of anomaly_score_*.csv files against ground truth.

    python tools/evaluate.py --scores SUBMISSION_DIR --truth DATASET_OR_GROUND_TRUTH [--year 2023] [--out DIR]

`--truth` is a labelled dataset folder or the organisers' ground truth (`eval_data_list.csv`,
or `ground_truth_data/` with `ground_truth_domain/`). Prints the per-section table and, as the
last line, `official score: 0.xxxx`; `--out` also writes metrics.csv and metrics.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from asd.errors import AsdError
from asd.evaluation import evaluate_submission
from asd.evaluation.metrics import YEARS, write_text_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", required=True, type=Path, help="folder of anomaly_score_*.csv files")
    parser.add_argument(
        "--truth", required=True, type=Path, help="labelled dataset folder or ground-truth CSVs"
    )
    parser.add_argument(
        "--year",
        type=int,
        choices=YEARS,
        help="DCASE year's metric definitions "
        "(default: 2020 for id_XX file names, 2021 for per-domain files, else 2023)",
    )
    parser.add_argument("--out", type=Path, help="write metrics.csv and metrics.md here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        result = evaluate_submission(args.scores, args.truth, year=args.year)
        markdown = result.to_markdown()
        if args.out is not None:
            result.to_csv(args.out / "metrics.csv")
            write_text_atomic(args.out / "metrics.md", markdown)
    except AsdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown)
    print(f"official score: {result.official:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
