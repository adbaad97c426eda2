"""A run: `train(cfg)` runs the stages fit -> backends -> calibrate -> predict -> report into a run
folder; `FinishedRun` loads one to score new recordings (`tools/score.py`). docs/architecture.md
describes the stages, the files between them and the member contract."""

from asd.run.distributed import is_rank_zero
from asd.run.finished import FinishedRun
from asd.run.job import train
from asd.run.stages import FINAL_CKPT

__all__ = ["FINAL_CKPT", "FinishedRun", "is_rank_zero", "train"]
