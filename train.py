"""Train and evaluate the asd ensemble: `python train.py [overrides]` (see conf/train.yaml)."""

import logging
import sys

import hydra
from omegaconf import DictConfig

from asd.errors import AsdError
from asd.run import is_rank_zero, train

log = logging.getLogger("asd")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run_dir = train(cfg)
    except AsdError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if is_rank_zero():
        print(run_dir, flush=True)  # the last line: the run folder


if __name__ == "__main__":
    main()
