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
