"""`Ensemble`: the selected members trained jointly in one pass over the data, with freezing.

Each member keeps its own optimizer (its own `configure_optimizers`), so per-member learning
rates and weight decay are real; the ensemble runs them under manual optimisation: one
forward per member, one backward of the weighted loss sum, one step per unfrozen member.
A frozen member has no optimizer, no gradients and stays in eval mode, so its parameters
*and* buffers (BatchNorm statistics) cannot move.

Each trainable member may also have its own gradient clipping (by norm) and learning-rate
scheduler (`branches.<member>.gradient_clip`, `branches.<member>.scheduler`). Manual
optimisation leaves both to us:
- clipping runs in `on_before_optimizer_step`, which Lightning calls inside `opt.step()` *after*
  AMP has unscaled the gradients; clipping in `training_step` would clip the scaled ones under
  `precision=16-mixed`. The logged `train/<member>/grad_norm` is the raw norm, before clipping.
- a scheduler is stepped after every optimizer step of its member (interval "step": budgets are
  counted in optimizer steps); Lightning checkpoints and restores its state like the optimizers'.
Settings for a frozen member are ignored with a warning, so one member config serves both the
run that trains a member and the run that freezes it.

Under `precision=16-mixed` one loss scaler serves every member (`MemberMixedPrecision`): each
member's optimizer is unscaled and stepped by it, and the scale is updated once per training step;
`train/amp/scale` and `train/amp/skipped_steps` (steps whose gradients held inf/NaN, so the scaler
skipped them) are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as L
import torch
from pytorch_lightning.plugins import MixedPrecision
from torch import Tensor, nn
from torch.optim import LBFGS, Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from asd.branches.base import Branch
from asd.errors import AsdError
from asd.features import prime_frontends
from asd.members import REFERENCES

log = logging.getLogger(__name__)

#: the flow member and the members whose embeddings it models (docs/architecture.md, "Members")
FLOW = "b5"
FLOW_SOURCES = ("b1", "b2", "b3")

#: what Hydra builds from a `_partial_: true` scheduler node: the member's optimizer -> its scheduler
SchedulerFactory = Callable[[Optimizer], LRScheduler]
T = TypeVar("T")


def is_reference(column: str) -> bool:
    """Whether a score column (`dcase_ae_mse`, `stats_knn`, ...) is a reference's."""
    return any(column == r or column.startswith(f"{r}_") for r in REFERENCES)


class Ensemble(L.LightningModule):
    """Selected members (and the reference) trained jointly; the module the Trainer runs and logs for."""

    def __init__(
        self,
        members: Mapping[str, Branch],
        loss_weights: Mapping[str, float] | None = None,
        frozen: Sequence[str] = (),
        grad_norm_every: int = 50,
        gradient_clip: Mapping[str, float | None] | float | None = None,
        schedulers: Mapping[str, SchedulerFactory | None] | None = None,
    ):
        """Build the ensemble.

        Args:
            members: the members by name, in training order.
            loss_weights: weight of each member's loss in the summed loss (default 1).
            frozen: members that do not train.
            grad_norm_every: log each trainable member's gradient norm (and scheduled learning rate)
                every this many global steps; 0 never.
            gradient_clip: max gradient norm per member name, or one value for every trainable member;
                None (or a missing name) does not clip.
            schedulers: per member name, a factory that takes the member's optimizer and returns its
                `LRScheduler`, stepped after each of that member's optimizer steps.
        """
        super().__init__()
        if not members:
            raise AsdError("the ensemble needs at least one member")
        self.members = nn.ModuleDict(dict(members))
        self.loss_weights = {n: float((loss_weights or {}).get(n, 1.0)) for n in self.members}
        self.frozen = list(frozen)
        #: reference score columns that feed the fusions beside the members (`fusion.references`)
        self.fused_references: tuple[str, ...] = ()
        stray = sorted(set(self.frozen) - set(self.members))
        if stray:
            raise AsdError(f"cannot freeze {stray}: not members of this ensemble ({list(self.members)})")
        self.grad_norm_every = grad_norm_every
        self.automatic_optimization = False
        #: debug mode (`debug_freeze.py`): every step, keep each member's loss and gradient norm,
        #: the frozen members' included, in `last_step` (costs a host sync per step)
        self.record = False
        self.last_step: dict[str, float] = {}
        for name in self.frozen:
            self.members[name].requires_grad_(False)
        self.train()
        self.gradient_clip: dict[str, float] = self.per_member("gradient_clip", gradient_clip)
        self.scheduler_factories: dict[str, SchedulerFactory] = self.per_member("scheduler", schedulers or {})
        #: decided once per batch by `training_step` for `on_before_optimizer_step`, which cannot decide
        #: itself: `global_step` advances with each member's optimizer step
        self.log_grad_norms = False

    def per_member(self, key: str, value: Mapping[str, T | None] | T | None) -> dict[str, T]:
        """`value` for each trainable member it sets: given by member name, or one for all of them."""
        if not isinstance(value, Mapping):
            return {} if value is None else dict.fromkeys(self.trainable, value)
        stray = sorted(set(value) - set(self.members))
        if stray:
            raise AsdError(
                f"{key} is set for {stray}: not members of this ensemble ({list(self.members)}); "
                f"set branches.<member>.{key} only for selected members"
            )
        ignored = [n for n, v in value.items() if v is not None and n not in self.trainable]
        if ignored:
            log.warning("%s of %s ignored: frozen or nothing to train", key, ignored)
        return {n: v for n, v in value.items() if v is not None and n not in ignored}

    @property
    def trainable(self) -> list[str]:
        """Members that train: not frozen, and with parameters to train (b1 in frozen mode has none)."""
        return [
            n
            for n in self.members
            if n not in self.frozen and any(p.requires_grad for p in self.members[n].parameters())
        ]

    @property
    def flow_sources(self) -> list[str]:
        """Members whose embeddings feed the flow member, when it is in the ensemble and sized for them."""
        if FLOW not in self.members or getattr(self.members[FLOW], "input_dim", None) is None:
            return []
        return [n for n in FLOW_SOURCES if n in self.members]

    def with_flow_input(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch plus `z`: the detached, concatenated embeddings of the flow's source members,
        and what each source's scoring reads back instead of a second pass (`Branch.flow_outputs`).

        The sources embed in eval mode, also during training: the flow learns the embeddings it
        will score (no dropout, BatchNorm's running statistics), and this extra forward pass
        must not move a source's running statistics, which its own training step keeps.
        """
        sources = self.flow_sources
        if not sources or "z" in batch:
            return batch
        modes = {n: self.members[n].training for n in sources}
        try:
            with torch.no_grad():
                for n in sources:
                    self.members[n].eval()
                kept = {k: v for n in sources for k, v in self.members[n].flow_outputs(batch).items()}
        finally:
            for n, mode in modes.items():
                self.members[n].train(mode)
        z = torch.cat([kept[f"z_{n}"].float() for n in sources], dim=1)  # (B, sum D) from (B, D_n) each
        return {**batch, "z": z, **kept}

    def prime(self, batch: Mapping[str, Tensor]) -> None:
        """Hand a batch's cached features to the members' front ends (`asd.features.prime_frontends`)."""
        prime_frontends(self.members.values(), batch)

    def train(self, mode: bool = True) -> Ensemble:
        # Lightning calls train() at every fit/validation switch: re-apply eval mode each time.
        super().train(mode)
        for name, member in self.members.items() if hasattr(self, "frozen") else ():
            # frozen members, and members with nothing to train (b1 in frozen mode), stay in eval mode
            if name in self.frozen or not any(p.requires_grad for p in member.parameters()):
                member.eval()
        return self

    def load_member(self, name: str, path: str | Path) -> None:
        """Restore one member from a checkpoint of this ensemble or of the member trained alone."""
        if name not in self.members:
            raise AsdError(f"ckpt.{name}: {name} is not a member of this ensemble ({list(self.members)})")
        path = Path(path).expanduser()
        if not path.is_file():
            raise AsdError(f"ckpt.{name}={path}: no such file; give a checkpoint written by asd")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for foreign files
            raise AsdError(f"ckpt.{name}={path}: not a readable weights-only checkpoint ({e})") from e
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise AsdError(f"ckpt.{name}={path}: holds no state_dict")
        prefix = f"members.{name}."
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            self.members[name].load_state_dict(state)
        except RuntimeError as e:
            raise AsdError(
                f"ckpt.{name}={path}: does not fit member {name} of this configuration "
                f"(another size or member?): {str(e).splitlines()[0]}"
            ) from e
        log.info("member %s restored from %s", name, path)

    # ------------------------------------------------------------------ training
    def losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each trainable member's loss on the batch (the flow on the others' detached embeddings)."""
        trainable = self.trainable
        if FLOW in trainable:
            batch = self.with_flow_input(batch)
        return {n: self.members[n].loss(batch) for n in trainable}

    def check_ids(self, batch: dict[str, Tensor]) -> None:
        """Every member's `Branch.check_ids` on a batch's CPU copy."""
        for member in self.members.values():
            member.check_ids(batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        if not self.trainable:
            return None
        self.prime(batch)
        losses = self.losses(batch)
        total = sum(self.loss_weights[n] * loss for n, loss in losses.items())
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(total)
        self.log_grad_norms = self.grad_norm_every > 0 and self.global_step % self.grad_norm_every == 0
        schedulers = self.member_schedulers()
        for name, opt in zip(self.trainable, optimizers, strict=True):
            opt.step()  # norm logging and clipping: in on_before_optimizer_step
            if name in schedulers:
                schedulers[name].step()
        self.log_grad_norms = False
        bs = len(batch["wave"])
        precision = self.trainer.precision_plugin
        if isinstance(precision, MemberMixedPrecision):
            precision.update_scale()  # once per step, after every member's scaler.step
            self.log("train/amp/scale", precision.scaler.get_scale(), batch_size=bs)
            self.log("train/amp/skipped_steps", float(precision.skipped_steps), batch_size=bs)
        for name, loss in losses.items():
            self.log(f"train/{name}/loss", loss.detach(), prog_bar=len(losses) < 4, batch_size=bs)
        self.log("train/loss", total.detach(), batch_size=bs)
        if self.record:
            self.last_step = self.step_record(batch, losses)
        return total.detach()

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        # inside opt.step(): gradients are unscaled (AMP) and not yet applied
        name = self.member_of(optimizer)
        if self.log_grad_norms:
            self.log(f"train/{name}/grad_norm", self.grad_norm(name))  # raw: before clipping
            if name in self.scheduler_factories:
                self.log(f"train/{name}/lr", float(optimizer.param_groups[0]["lr"]))  # the lr this step uses
        if name in self.gradient_clip:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.gradient_clip[name], gradient_clip_algorithm="norm"
            )

    def member_of(self, optimizer: Optimizer) -> str:
        """The member that `optimizer` (one of `configure_optimizers`') trains."""
        return next(n for n, o in zip(self.trainable, self.trainer.optimizers, strict=True) if o is optimizer)

    def member_schedulers(self) -> dict[str, LRScheduler]:
        """The schedulers of `configure_optimizers` (restored on resume) by member name."""
        schedulers = self.lr_schedulers() or []
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        return {self.member_of(s.optimizer): s for s in schedulers}

    def step_record(self, batch: dict[str, Tensor], losses: dict[str, Tensor]) -> dict[str, float]:
        """Every member's loss and gradient norm after this step's backward (frozen: loss without grad)."""
        record = {}
        for name, member in self.members.items():
            if name in losses:
                loss = losses[name].detach()
            else:
                with torch.no_grad():
                    loss = member.loss(self.with_flow_input(batch) if name == FLOW else batch)
            record[f"{name}/loss"] = float(loss)
            record[f"{name}/grad_norm"] = float(self.grad_norm(name))
        return record

    def grad_norm(self, name: str) -> Tensor:
        """L2 norm of one member's gradients (zero when it has none), without a host sync."""
        grads = [
            p.grad.detach().float().norm() for p in self.members[name].parameters() if p.grad is not None
        ]
        return torch.stack(grads).norm() if grads else torch.zeros((), device=self.device)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        bs = len(batch["wave"])
        self.prime(batch)
        batch = self.with_flow_input(batch)
        for name, member in self.members.items():
            self.log(f"val/{name}/loss", member.loss(batch), batch_size=bs, sync_dist=True)

    def configure_optimizers(self) -> list[Optimizer] | tuple[list[Optimizer], list[dict[str, Any]]]:
        """One optimizer per trainable member, in `trainable` order; plus the members' schedulers, if any."""
        optimizers, schedulers = [], []
        for name in self.trainable:
            opt = self.members[name].configure_optimizers()
            if isinstance(opt, (list, tuple)) or isinstance(opt, dict):
                raise AsdError(f"member {name}: configure_optimizers must return one optimizer")
            optimizers.append(opt)
            if name in self.scheduler_factories:
                factory = self.scheduler_factories[name]  # asd.run.build.BudgetScheduler: a length `auto`
                budget = getattr(factory, "needs_budget", False)
                sched = factory(opt, self.trainer, len(self.trainable)) if budget else factory(opt)
                if not isinstance(sched, LRScheduler) or isinstance(sched, ReduceLROnPlateau):
                    raise AsdError(
                        f"branches.{name}.scheduler made {type(sched).__name__}: give a torch LRScheduler "
                        "stepped per optimizer step, as a _partial_ node (ReduceLROnPlateau needs a "
                        "monitored metric and is not supported)"
                    )
                # "step" is for LearningRateMonitor; training_step does the stepping in manual optimisation
                schedulers.append({"scheduler": sched, "interval": "step"})
        return (optimizers, schedulers) if schedulers else optimizers


class MemberMixedPrecision(MixedPrecision):
    """`16-mixed` for the ensemble's manual optimisation: `scaler.step` per member, one `update` per step.

    Lightning's `MixedPrecision.optimizer_step` (2.6) unscales, runs `on_before_optimizer_step`,
    steps, then calls `scaler.update()` — after *each* optimizer. With one optimizer per member the
    scale then changes between members of one backward pass (a later member's gradients are
    unscaled by a scale they were not scaled with) and the scaler's growth counter counts member
    steps, not training steps. PyTorch's recipe for several optimizers is `unscale_`/`step` per
    optimizer and one `update()` per iteration: `optimizer_step` does the former and
    `Ensemble.training_step` calls `update_scale` once after its members' steps.
    """

    def __init__(self, device: str, scaler: torch.amp.GradScaler | None = None):
        super().__init__("16-mixed", device, scaler)
        #: training steps whose gradients held inf/NaN, so the scaler skipped them (cumulative)
        self.skipped_steps = 0

    def optimizer_step(
        self, optimizer: Optimizer, model: Any, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        if model.automatic_optimization:  # one optimizer per step: Lightning's own bookkeeping is right
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        if isinstance(optimizer, LBFGS):
            raise AsdError("precision=16-mixed cannot step LBFGS; use another optimizer or bf16-mixed")
        closure()  # manual optimisation: backward already ran, the closure does nothing
        if not getattr(optimizer, "_step_supports_amp_scaling", False):  # fused optimizers unscale themselves
            self.scaler.unscale_(optimizer)
        self._after_closure(model, optimizer)  # on_before_optimizer_step: norms, clipping on unscaled grads
        return self.scaler.step(optimizer, **kwargs)  # skipped when this optimizer's grads hold inf/NaN

    def update_scale(self) -> None:
        """The step's one `scaler.update()`; a smaller scale after it means inf/NaN were found."""
        before = self.scaler.get_scale()
        self.scaler.update()
        self.skipped_steps += self.scaler.get_scale() < before  # backoff only follows an inf/NaN step

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state_dict.get("scaler", state_dict))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
