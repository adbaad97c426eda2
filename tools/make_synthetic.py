"""Write the built-in synthetic dataset to a folder: `python tools/make_synthetic.py --out DIR`."""

from __future__ import annotations

import argparse
import logging
import sys

from asd.data.synthetic import MODELS, SyntheticConfig, ensure_synthetic, read_manifest
from asd.errors import AsdError

DEFAULT = SyntheticConfig()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", required=True, help="dataset folder (new, empty, or an older synthetic dataset)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT.seed)
    parser.add_argument("--sections", type=int, default=DEFAULT.sections)
    parser.add_argument("--source-train", type=int, default=DEFAULT.source_train)
    parser.add_argument("--target-train", type=int, default=DEFAULT.target_train)
    parser.add_argument("--test-per-class", type=int, default=DEFAULT.test_per_class)
    parser.add_argument("--duration", type=float, default=DEFAULT.duration, help="seconds per clip")
    parser.add_argument("--difficulty", type=float, default=DEFAULT.difficulty, help="0 obvious ... 1 subtle")
    parser.add_argument("--machines", nargs="+", default=list(DEFAULT.machines), help=f"some of {MODELS}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = SyntheticConfig(
            machines=tuple(args.machines),
            sections=args.sections,
            source_train=args.source_train,
            target_train=args.target_train,
            test_per_class=args.test_per_class,
            duration=args.duration,
            difficulty=args.difficulty,
            seed=args.seed,
        )
        root = ensure_synthetic(args.out, cfg)
    except AsdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = read_manifest(root)
    print(root)
    print(f"{manifest['files']} clips, key {manifest['key']}; per machine ({', '.join(cfg.machines)}):")
    for group, count in sorted(manifest["counts_per_machine"].items()):
        print(f"  {group:22s} {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
