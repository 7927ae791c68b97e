"""CLFR: closed-loop FLOPS regularization -- a controller that steers the documents' non-zero count to a target.

Every ``interval_steps`` optimizer steps (default: one epoch of steps) the controller takes the documents' mean
number of non-zeros, measured on the **training batches since the previous adjustment** (entries with weight > 0,
summed and counted over all ranks under DDP, so every rank acts on the global mean), and updates

    lambda_d <- lambda_d * exp( clip( gain * (nnz - target) / target,  -max_log_step, +max_log_step ) )

with gain in (0, 1] (card: 0.1), target = target_nnz_d (card: 400) and max_log_step = 1 (at most a factor e per
adjustment). In log space this is an integral controller: log lambda_d accumulates gain x relative error. If
the documents' non-zeros respond to lambda_d like nnz ~ lambda_d^(-a) near the target, the relative error
shrinks by (1 - gain * a) per adjustment, so it converges monotonically for gain * a <= 1 and without blow-up
for gain * a < 2; SPLADE-like models have a < 1, so any gain in (0, 1] is stable.

The effective regularization ``eff_reg = sum over optimizer steps of lambda_d`` is logged next to lambda_d.

:class:`CLFRCallback` drives :class:`~fles1.training.trainer.FLES1Trainer`; :class:`SpladeCLFRCallback` drives
sentence-transformers' ``SparseEncoderTrainer`` + ``SpladeLoss``, taking the regularizer-weight-scheduler slot
so that trainer does not overwrite ``document_regularizer_weight``. Both save their state as ``clfr_state.json``
inside every checkpoint folder and restore it when training resumes from that checkpoint.

    >>> from fles1.training.clfr import CLFRController
    >>> controller = CLFRController(lambda_d=3e-5, target_nnz=400, gain=0.1)
    >>> round(controller.update(measured_nnz=600, step=100) / 3e-5, 4)  # 50 % too dense -> exp(0.05)
    1.0513
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import torch
from transformers import TrainerCallback

from .checkpoint_state import CheckpointStateMixin
from .checks import check_count_or_none, is_int, is_number
from .distributed import all_reduce_sum, first_rank_only, sums_onto_first_rank

STATE_FILE = "clfr_state.json"
MAX_LOG_STEP_LIMIT = 10.0  # a factor e^10 per adjustment; beyond that it is a switch, not a controller


def optimizer_steps_per_epoch(batches: int, accumulation: int) -> int:
    """As transformers counts them: a short last accumulation is a step too (at least one step)."""
    return max(math.ceil(batches / accumulation), 1)


class CLFRDiverged(ValueError):
    """lambda_d left float range: the documents' non-zeros stayed far from the target whatever lambda_d was."""


class CLFRController:
    """The multiplicative lambda_d update (module docstring); plain Python, no trainer needed."""

    def __init__(self, lambda_d: float, target_nnz: float, gain: float = 0.1, max_log_step: float = 1.0):
        # checked before compared: "abc" or None would be a TypeError, True would pass as 1
        if not (is_number(target_nnz, finite=True) and target_nnz > 0):
            raise ValueError(f"target_nnz must be a finite number > 0 (documents' mean non-zeros), got {target_nnz!r}")
        if not (is_number(gain) and 0 < gain <= 1):
            raise ValueError(f"gain must be a number in (0, 1], got {gain!r}")
        if not (is_number(lambda_d, finite=True) and lambda_d > 0):
            raise ValueError(f"lambda_d must be a finite number > 0 for a multiplicative controller, got {lambda_d!r}")
        if not (is_number(max_log_step) and 0 < max_log_step <= MAX_LOG_STEP_LIMIT):  # exp() overflowed above ~709
            raise ValueError(f"max_log_step must be a number in (0, {MAX_LOG_STEP_LIMIT:g}], got {max_log_step!r} (the "
                             "largest change of log lambda_d per adjustment)")
        self.lambda_d = float(lambda_d)
        self.target_nnz = float(target_nnz)
        self.gain = float(gain)
        self.max_log_step = float(max_log_step)
        self.history: list[dict] = []

    def update(self, measured_nnz: float, step: int) -> float:
        """Apply one adjustment for ``measured_nnz`` and return the new lambda_d."""
        if not (is_number(measured_nnz, finite=True) and measured_nnz >= 0):  # NaN passed min() as a full step up
            raise ValueError(f"measured_nnz must be a finite number >= 0, got {measured_nnz!r}")
        error = (float(measured_nnz) - self.target_nnz) / self.target_nnz
        log_step = max(-self.max_log_step, min(self.max_log_step, self.gain * error))
        before, after = self.lambda_d, self.lambda_d * math.exp(log_step)
        if not (math.isfinite(after) and after > 0):  # many steps one way: lambda_d left float range
            raise CLFRDiverged(f"lambda_d left float range ({before!r} -> {after!r}) at step {step}: the documents' "
                               f"non-zeros ({measured_nnz!r}) stay far from target_nnz ({self.target_nnz:g}) whatever "
                               "lambda_d is")
        self.lambda_d = after
        self.history.append(
            {
                "step": int(step),
                "measured_nnz": float(measured_nnz),
                "target_nnz": self.target_nnz,
                "lambda_d_before": before,
                "lambda_d_after": self.lambda_d,
            }
        )
        return self.lambda_d

    def state_dict(self) -> dict:
        return {"lambda_d": self.lambda_d, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.lambda_d = float(state["lambda_d"])
        self.history = list(state["history"])


class CLFRCallback(CheckpointStateMixin, TrainerCallback):
    """Runs a :class:`CLFRController` inside a transformers ``Trainer``.

    The trainer (or a loss wrapper) calls :meth:`observe` with each batch's documents' non-zero sum and count;
    every ``interval_steps`` optimizer steps the callback all-reduces them and updates lambda_d.

    Args:
        controller: the controller whose ``lambda_d`` the loss reads.
        interval_steps: optimizer steps between adjustments; ``None`` = one epoch of steps.
    """

    STATE_FILE = STATE_FILE
    STATE_FIELDS = {"lambda_d": lambda value: is_number(value, finite=True) and value > 0,
                    "history": lambda value: isinstance(value, list), "eff_reg": is_number,
                    "nnz_sum": is_number, "nnz_count": is_number}

    def __init__(self, controller: CLFRController, interval_steps: int | None = None):
        check_count_or_none(interval_steps, "interval_steps", "None (one epoch)")
        self.controller = controller
        self.interval_steps = interval_steps
        self._interval = interval_steps  # resolved at train begin when None
        self.resume_from: str | None = None  # set by the trainer when it resumes from a checkpoint
        self.reset()

    def reset(self) -> None:
        self.nnz_sum = 0.0
        self.nnz_count = 0.0
        self.eff_reg = 0.0

    @property
    def lambda_d(self) -> float:
        return self.controller.lambda_d

    def observe(self, nnz_sum: float, count: int) -> None:
        """Documents of one (micro-)batch on this rank: total non-zeros and number of documents."""
        self.nnz_sum += float(nnz_sum)
        self.nnz_count += float(count)

    # --- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            **self.controller.state_dict(),
            "interval_steps": self._interval,
            "nnz_sum": self.nnz_sum,
            "nnz_count": self.nnz_count,
            "eff_reg": self.eff_reg,
        }

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state)
        self.eff_reg = state["eff_reg"]
        if self._interval is None and is_int(state.get("interval_steps")):  # a one-epoch interval, as resolved then:
            self._interval = state["interval_steps"]  # a run finished from its last checkpoint logged null
        # the interval's sums so far are all ranks' (`write_state`): one rank carries them on, or a resumed run's
        # next adjustment would count them once per rank
        self.nnz_sum, self.nnz_count = first_rank_only([state["nnz_sum"], state["nnz_count"]])

    def write_state(self, args, state) -> None:
        """Rank 0 writes the checkpoint's file: first move every rank's non-zero sums since the last adjustment onto
        it (their total is unchanged; every rank calls this at the same checkpoints), so the file holds the
        interval's sums over all ranks -- rank 0's own alone made a resumed run's next adjustment differ."""
        self.nnz_sum, self.nnz_count = sums_onto_first_rank([self.nnz_sum, self.nnz_count],
                                                            getattr(self, "_device", None))
        super().write_state(args, state)

    # --- trainer events ---------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self._interval = self.interval_steps
        if self._interval is None:
            if train_dataloader is None:
                raise ValueError("interval_steps=None (one epoch) needs the trainer's train_dataloader")
            self._interval = optimizer_steps_per_epoch(len(train_dataloader), args.gradient_accumulation_steps)
        # a short run (--max-steps) of a one-epoch interval, say
        if 0 < (getattr(state, "max_steps", 0) or 0) < self._interval:
            warnings.warn(f"CLFR adjusts lambda_d every {self._interval} optimizer steps and this run has "
                          f"{state.max_steps}: lambda_d stays {self.controller.lambda_d:g} (clfr.interval_steps)",
                          stacklevel=2)
        self._device = args.device
        if state.global_step > 0 and not self.restore(args, state):  # resuming
            raise FileNotFoundError(f"{os.path.join(self.checkpoint_folder(args, state), STATE_FILE)}: missing (nor is "
                                    "a copy in the trainer state resumed from); cannot resume CLFR state")
        self.apply(self.controller.lambda_d)

    def apply(self, lambda_d: float) -> None:
        """Hand the new lambda_d to the loss (FLES1Trainer reads ``controller.lambda_d`` directly)."""

    def on_step_end(self, args, state, control, **kwargs):
        self.eff_reg += self.controller.lambda_d
        if state.global_step % self._interval == 0:
            total, count = all_reduce_sum([self.nnz_sum, self.nnz_count], self._device)
            if count > 0:
                self.apply(self.controller.update(total / count, state.global_step))
            else:
                warnings.warn(f"CLFR measured no training documents in the {self._interval} steps up to step "
                              f"{state.global_step} (every batch non-finite, or the trainer's loss is not the one "
                              f"this callback observes): lambda_d stays {self.controller.lambda_d:g}", stacklevel=2)
            self.nnz_sum = self.nnz_count = 0.0
        self.save_ahead(args, state, control)  # after the update: the state a resumed run continues from


def _splade_scheduler_base():
    from sentence_transformers.sparse_encoder.callbacks import SpladeRegularizerWeightSchedulerCallback

    return SpladeRegularizerWeightSchedulerCallback


def _record_documents(regularizer, callback: "SpladeCLFRCallback") -> None:
    """Make SpladeLoss's document regularizer report each training batch's documents to `callback` (the newest
    callback given this regularizer, for a second training phase), then compute as before. The instance's own
    method is wrapped, not the module: SpladeLoss's config (the model card's loss section: FlopsLoss, its
    threshold) keeps seeing the regularizer it was given."""
    callbacks = regularizer.__dict__.get("_fles1_clfr_callbacks")
    if callbacks is not None:  # an earlier callback's
        callbacks[0] = callback
        return
    callbacks = regularizer.__dict__["_fles1_clfr_callbacks"] = [callback]
    compute = regularizer.compute_loss_from_embeddings

    def compute_loss_from_embeddings(embeddings, *args, **kwargs):
        if torch.is_grad_enabled():  # training batches only: evaluation runs under no_grad (prediction_step)
            callbacks[0].observe_training_documents(embeddings)
        return compute(embeddings, *args, **kwargs)

    regularizer.compute_loss_from_embeddings = compute_loss_from_embeddings


class SpladeCLFRCallback(CLFRCallback, _splade_scheduler_base()):
    """CLFR for sentence-transformers' ``SparseEncoderTrainer`` + ``SpladeLoss``.

    Being a ``SpladeRegularizerWeightSchedulerCallback`` bound to the same loss, it takes the trainer's
    regularizer-scheduler slot (no default warm-up scheduler is added to overwrite lambda_d). It measures the
    documents' non-zeros inside ``loss.document_regularizer`` and writes lambda_d to
    ``loss.document_regularizer_weight``; the query weight is left as configured.

    Example:

    ```python
    loss = SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=3e-5)
    clfr = SpladeCLFRCallback(loss, target_nnz=400, gain=0.1, interval_steps=100)
    trainer = SparseEncoderTrainer(model=model, train_dataset=data, loss=loss, callbacks=[clfr])
    ```
    """

    def __init__(self, loss, target_nnz: float, gain: float = 0.1, interval_steps: int | None = None,
                 max_log_step: float = 1.0):
        from sentence_transformers.sparse_encoder.losses import SpladeLoss

        if not isinstance(loss, SpladeLoss):
            raise TypeError(f"loss must be a SpladeLoss, got {type(loss).__name__}")
        weight = loss.document_regularizer_weight
        if not (is_number(weight, finite=True) and weight > 0):  # CLFR's lambda_d starts from it, multiplicatively
            raise ValueError(f"loss.document_regularizer_weight must be a finite number > 0 for CLFR, which steers the "
                             f"documents' regularizer weight; got {weight!r}")
        controller = CLFRController(weight, target_nnz, gain, max_log_step)
        CLFRCallback.__init__(self, controller, interval_steps)
        self.loss = loss  # the trainer matches its scheduler slot on `callback.loss is loss`
        self._overwritten = False
        if getattr(loss, "query_regularizer", None) is loss.document_regularizer:
            # one object regularizing both sides: the query side gets its own (unrecorded) copy, or CLFR would count
            # the queries as documents
            query = copy.copy(loss.query_regularizer)
            for name in ("compute_loss_from_embeddings", "_fles1_clfr_callbacks"):  # an earlier callback's recording
                query.__dict__.pop(name, None)
            loss.query_regularizer = query
        _record_documents(loss.document_regularizer, self)

    def observe_training_documents(self, embeddings) -> None:
        """One training batch's documents, inside the loss: their non-zeros (a diverged batch's NaN vectors hold no
        entry > 0 and are no density, as in FLES1Trainer), and the weight the loss is about to apply -- SpladeLoss
        multiplies by it after the regularizer returns, so a value another scheduler wrote is still mended here."""
        with torch.no_grad():  # one device-to-host copy for both numbers
            nnz, not_finite = torch.stack([(embeddings > 0).sum(), (~torch.isfinite(embeddings)).sum()]).tolist()
        if not not_finite:
            self.observe(float(nnz), embeddings.shape[0])
        if self.loss.document_regularizer_weight != self.controller.lambda_d:
            if not self._overwritten:
                self._overwritten = True
                warnings.warn(f"something else set the SpladeLoss's document_regularizer_weight to "
                              f"{self.loss.document_regularizer_weight:g} (another "
                              "SpladeRegularizerWeightSchedulerCallback on this loss, listed after CLFR?); CLFR "
                              f"sets it back to its lambda_d {self.controller.lambda_d:g}: remove the other one",
                              stacklevel=2)
            self.apply(self.controller.lambda_d)

    def apply(self, lambda_d: float) -> None:
        self.loss.document_regularizer_weight = lambda_d

    def on_step_begin(self, args, state, control, **kwargs):
        self._lambda_d_used = self.controller.lambda_d  # the log shows it, not the value CLFR may set at step end
        self.apply(self._lambda_d_used)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """lambda_d and eff_reg into the log: the console, callbacks after this one, and ``state.log_history``
        (trainer_state.json), which transformers appended to before any callback ran. Integrations (``report_to``)
        run before user callbacks and miss them unless this callback comes first: construct the trainer without it
        and then ``trainer.callback_handler.callbacks.insert(0, clfr)`` (registered twice, it would count each step
        twice)."""
        if logs is not None:
            values = {"lambda_d": getattr(self, "_lambda_d_used", self.controller.lambda_d), "eff_reg": self.eff_reg}
            logs.update(values)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(values)
