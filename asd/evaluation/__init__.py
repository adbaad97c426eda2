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
from asd.evaluation.threshold import (
    THRESHOLD_MODELS,
    clip_far_out,
    decide,
    fit_gamma_threshold,
    midpoint_threshold,
    normal_bound,
    pooled_spread,
)

__all__ = [
    "THRESHOLD_MODELS",
    "Evaluation",
    "auc_pauc",
    "clip_far_out",
    "decide",
    "evaluate",
    "evaluate_submission",
    "fit_gamma_threshold",
    "hmean",
    "midpoint_threshold",
    "normal_bound",
    "official_score",
    "plot_histograms",
    "plot_roc",
    "pooled_spread",
    "read_ground_truth",
    "read_submission",
    "submission_year",
    "write_submission",
]
