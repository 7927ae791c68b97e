"""Crash accounting: what counts as a training crash, and what happens then.

Per optimizer step (all micro-batches of a gradient-accumulation step together):

    non_finite_loss  the loss of any micro-batch is NaN/inf           -> update skipped (gradients dropped)
    non_finite_grad  the loss is finite but a gradient is NaN/inf      -> update skipped (gradients dropped)
    loss_spike       loss > spike_factor x median of the last spike_window finite step losses (once at least
                     5 are known)                                      -> counted, update applied
    nnz_collapse     the documents' mean non-zeros < max(nnz_floor, nnz_collapse_fraction x the first step's)
                                                                       -> counted, update applied

"Skipped" means the gradients are set to None before ``optimizer.step()``: AdamW then leaves every weight and its
moments untouched (no weight decay either); only the learning-rate schedule advances. Under DDP every rank judges
the global step: gradients are all-reduced first, and the losses (their mean over ranks), non-zeros and finiteness
are summed over ranks here, so all ranks count and skip the same steps, as one process would.
"""

from __future__ import annotations

import math
import statistics

import torch
from transformers import TrainerCallback

from .checkpoint_state import CheckpointStateMixin
from .checks import is_int, is_number
from .distributed import all_reduce_sum, world_size

KINDS = ("non_finite_loss", "non_finite_grad", "loss_spike", "nnz_collapse")
STATE_FILE = "crash_state.json"
MIN_SPIKE_HISTORY = 5


class CrashMonitor(CheckpointStateMixin, TrainerCallback):
    """Counts crashes by kind and skips non-finite updates. The trainer calls :meth:`observe` per micro-batch."""

    STATE_FILE = STATE_FILE
    STATE_FIELDS = {"counts": lambda value: isinstance(value, dict) and all(map(is_int, value.values())),
                    "recent_losses": lambda value: isinstance(value, list) and all(map(is_number, value)),
                    "events": lambda value: isinstance(value, list)}

    def __init__(self, spike_factor: float = 3.0, spike_window: int = 100, nnz_floor: float = 1.0,
                 nnz_collapse_fraction: float = 0.1):
        # checked before compared: "abc" or None would be a TypeError, True would pass as 1
        if not (is_number(spike_factor) and spike_factor > 1):
            raise ValueError(f"spike_factor must be a number > 1, got {spike_factor!r}")
        if not (is_int(spike_window) and spike_window >= MIN_SPIKE_HISTORY):
            raise ValueError(f"spike_window must be an int >= {MIN_SPIKE_HISTORY}, got {spike_window!r}")
        if not (is_number(nnz_floor) and nnz_floor >= 0):  # NaN or below 0 would never count a collapse
            raise ValueError(f"nnz_floor must be a number >= 0, got {nnz_floor!r}")
        if not (is_number(nnz_collapse_fraction) and 0 <= nnz_collapse_fraction < 1):
            raise ValueError(f"nnz_collapse_fraction must be a number in [0, 1), got {nnz_collapse_fraction!r}")
        self.spike_factor, self.spike_window, self.nnz_floor = float(spike_factor), spike_window, float(nnz_floor)
        # relative to the first step: a model sliding from ~230 to ~6 non-zeros has collapsed though it is above 1
        self.nnz_collapse_fraction = float(nnz_collapse_fraction)
        self.first_nnz: float | None = None
        self.counts = {kind: 0 for kind in KINDS}
        self.recent_losses: list[float] = []
        self.events: list[dict] = []
        self.resume_from: str | None = None
        self._new_step()

    def _new_step(self):
        self._loss, self._batches, self._nnz_sum, self._nnz_count, self._loss_finite = 0.0, 0, 0.0, 0, True

    def observe(self, loss: float, nnz_sum: float, nnz_count: int) -> None:
        """One micro-batch: its loss (a batch mean), its documents' total non-zeros and their number."""
        finite = math.isfinite(loss)
        self._loss_finite &= finite
        self._loss += loss
        self._batches += 1
        if finite:  # a NaN batch's vectors hold no entry > 0: not also a collapse, nor the baseline (as for CLFR)
            self._nnz_sum += nnz_sum
            self._nnz_count += nnz_count

    def totals(self) -> dict:
        return {**self.counts, "total": sum(self.counts.values())}

    def _count(self, kind: str, step: int, value: float) -> None:
        self.counts[kind] += 1
        self.events.append({"step": step, "kind": kind, "value": value})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1  # the step this update would become
        ranks = world_size()
        if ranks > 1:  # one rank's NaN batch or spike is the step's, and every rank keeps the same history
            self._loss, self._batches, self._nnz_sum, self._nnz_count, finite = all_reduce_sum(
                [self._loss, self._batches, self._nnz_sum, self._nnz_count, self._loss_finite], args.device)
            self._loss_finite = finite == ranks
        # the step's loss is the mean over its micro-batches, as logged: a sum would grow with gradient
        # accumulation, and an epoch's short last step would be measured against full steps' sums
        self._loss /= max(self._batches, 1)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grads_finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if not self._loss_finite or not grads_finite:
            self._count("non_finite_loss" if not self._loss_finite else "non_finite_grad", step, self._loss)
            model.zero_grad(set_to_none=True)
        else:
            if len(self.recent_losses) >= MIN_SPIKE_HISTORY:
                if self._loss > self.spike_factor * statistics.median(self.recent_losses):
                    self._count("loss_spike", step, self._loss)
            self.recent_losses = (self.recent_losses + [self._loss])[-self.spike_window:]
        if self._nnz_count:
            nnz = self._nnz_sum / self._nnz_count
            if self.first_nnz is None:
                self.first_nnz = nnz
            if nnz < max(self.nnz_floor, self.nnz_collapse_fraction * self.first_nnz):
                self._count("nnz_collapse", step, nnz)
        self._new_step()

    # --- checkpoint state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "recent_losses": list(self.recent_losses), "events": list(self.events),
                "first_nnz": self.first_nnz}

    def load_state_dict(self, state: dict) -> None:
        self.counts = {kind: int(state["counts"].get(kind, 0)) for kind in KINDS}
        self.recent_losses = [float(v) for v in state["recent_losses"]]
        self.events = list(state["events"])
        self.first_nnz = state.get("first_nnz")  # absent in checkpoints written before it existed

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            self.restore(args, state)
