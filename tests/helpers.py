"""Small helpers shared by the test files (import as `from helpers import ...`)."""

import copy
from collections.abc import Callable

import pytorch_lightning as L
import torch

import asd.branches.base as branch_base


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


def assert_same_in_both_memory_formats(monkeypatch, start, batch: dict, layer: Callable) -> None:
    """`start` (a member) gives the same train-mode loss, gradients and eval-mode scores with its
    convolutions' inputs in channels-last memory (`CONV_MEMORY_FORMAT`, the default) as in NCHW, up
    to floating-point order; and `layer(member)`, a convolution, really sees channels-last input by
    default and NCHW otherwise (give one with more than 1 input channel: a 1-channel tensor has the
    same strides in both formats)."""
    seen, out = {}, []
    for fmt in (torch.channels_last, torch.contiguous_format):
        monkeypatch.setattr(branch_base, "CONV_MEMORY_FORMAT", fmt)
        m = copy.deepcopy(start).train()
        hook = layer(m).register_forward_pre_hook(
            lambda _, args, f=fmt: seen.setdefault(f, []).append(
                args[0].is_contiguous(memory_format=torch.channels_last)
            )
        )
        torch.manual_seed(1)  # whatever the member draws in training
        loss = m.loss(batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
        out.append((loss.detach(), grads, m.eval().score(batch)))
        hook.remove()
    # every call of the layer saw channels-last input by default, and none with NCHW
    assert all(seen[torch.channels_last]) and not any(seen[torch.contiguous_format])
    for got, want in zip(*out, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
