"""The sums behind the next training-log row, saved with each checkpoint.

A log row averages its window: the micro-batches since the previous row. A checkpoint saved between two rows
(``save_steps`` not a multiple of ``logging_steps``) used to lose the window's first part, so a resumed run's first
row averaged fewer steps than the uninterrupted run's, with nothing to say so. The window now travels with the
checkpoint (``log_window.json``); a checkpoint without one (written before this file existed) resumes with an
empty window, as before.
"""

from __future__ import annotations

from collections import defaultdict

from transformers import TrainerCallback

from .checkpoint_state import CheckpointStateMixin
from .checks import is_number
from .distributed import all_reduce_sum, first_rank_only, sums_onto_first_rank

STATE_FILE = "log_window.json"


def _epoch_row_follows(args, state) -> bool:
    """Under logging_strategy epoch, an epoch's last step: its row is logged at the epoch's end, after the step's
    checkpoint is saved, and takes the window then."""
    strategy = getattr(args.logging_strategy, "value", args.logging_strategy)
    return strategy == "epoch" and float(state.epoch or 0).is_integer()


class LogWindow(CheckpointStateMixin, TrainerCallback):
    """Sums of the named quantities (loss parts, non-zeros, counts) since the last log row: the trainer `add`s per
    micro-batch and `take`s them (summed over ranks) when it logs."""

    STATE_FILE = STATE_FILE

    @classmethod
    def readable_state(cls, state) -> bool:  # any names (a run's own), each with a number
        return isinstance(state, dict) and all(map(is_number, state.values()))

    def __init__(self, names: list[str]):
        self.names = list(names)  # every rank reduces the same list, in this order (gloo/NCCL hang otherwise)
        self.sums = defaultdict(float)
        self.resume_from: str | None = None
        self._logs_now = False  # the step being saved also logs: the row takes the window, the checkpoint none

    def add(self, name: str, value: float) -> None:
        if name not in self.names:  # summed here, never reduced nor logged: a typo
            raise KeyError(f"{name!r} is not one of the log window's {self.names}")
        self.sums[name] += value

    def take(self, device=None) -> dict:
        """The window's sums over every rank (each rank calls this at the same step), then an empty window."""
        totals = dict(zip(self.names, all_reduce_sum([self.sums[name] for name in self.names], device)))
        self.sums = defaultdict(float)
        return totals

    def state_dict(self) -> dict:
        return {} if self._logs_now else dict(self.sums)

    def load_state_dict(self, state: dict) -> None:
        # the file holds every rank's sums (`write_state`): one rank carries them on
        self.sums = defaultdict(float, zip(state, first_rank_only(list(state.values()))))

    def write_state(self, args, state) -> None:
        """Rank 0 writes the checkpoint's file: every rank's sums move onto it first (as CLFR's do)."""
        if not self._logs_now:
            totals = sums_onto_first_rank([self.sums[name] for name in self.names], args.device)
            self.sums = defaultdict(float, zip(self.names, totals))
        super().write_state(args, state)

    def save_ahead(self, args, state, control) -> None:
        # a row follows at this step (should_log: set by transformers' flow callback before this one)
        self._logs_now = control.should_log or _epoch_row_follows(args, state)
        super().save_ahead(args, state, control)
        self._logs_now = False

    def on_save(self, args, state, control, **kwargs):
        # after the step's row (taken already), but before an epoch's row
        self._logs_now = _epoch_row_follows(args, state)
        super().on_save(args, state, control, **kwargs)
        self._logs_now = False

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resuming: a checkpoint without the file (older) starts from an empty window
            self.restore(args, state)
