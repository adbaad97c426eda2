"""Small helpers shared by the test files (import as `from helpers import ...`)."""

import pytorch_lightning as L


def quick_trainer(max_steps: int, **kwargs) -> L.Trainer:
    """A CPU Trainer with nothing written and nothing printed: for a few real optimizer steps."""
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


#: the smallest fusion config that fits in a blink: attention and first-order MAML, a few steps
TINY_FUSION_CFG = {
    "seed": 0,
    "attention": {"hidden": 4, "context_dim": 2, "epochs": 5, "lr": 0.01, "weight_decay": 0.0},
    "meta": {
        "hidden": 4,
        "inner_lr": 0.1,
        "inner_steps": 1,
        "test_steps": 1,
        "first_order": True,
        "vmap": True,
        "meta_steps": 3,
        "meta_lr": 3e-3,
        "support_fraction": 0.5,
    },
}
