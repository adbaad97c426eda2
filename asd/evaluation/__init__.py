"""Official DCASE Task 2 evaluation: metrics, decision thresholds, submission CSVs and plots."""

from asd.evaluation.export import (
    evaluate_submission,
    read_ground_truth,
    read_submission,
    submission_year,
    write_submission,
)
from asd.evaluation.metrics import Evaluation, auc_pauc, evaluate, hmean, official_score
from asd.evaluation.plots import plot_histograms, plot_roc
from asd.evaluation.threshold import clip_far_out, decide, fit_gamma_threshold, midpoint_threshold

__all__ = [
    "Evaluation",
    "auc_pauc",
    "clip_far_out",
    "decide",
    "evaluate",
    "evaluate_submission",
    "fit_gamma_threshold",
    "hmean",
    "midpoint_threshold",
    "official_score",
    "plot_histograms",
    "plot_roc",
    "read_ground_truth",
    "read_submission",
    "submission_year",
    "write_submission",
]
