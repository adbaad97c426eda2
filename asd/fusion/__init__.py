"""Learned fusions of the members' normalised scores: attention over members and a MAML meta-learner."""

from asd.fusion.attention import AttentionFusion, fit_attention, group_weights, plot_attention_weights
from asd.fusion.meta import MAML, MetaClassifier, Tasks, make_tasks, meta_features

__all__ = [
    "MAML",
    "AttentionFusion",
    "MetaClassifier",
    "Tasks",
    "fit_attention",
    "group_weights",
    "make_tasks",
    "meta_features",
    "plot_attention_weights",
]
