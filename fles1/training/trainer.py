"""FLES1Trainer: transformers' Trainer with the FLES-1 loss, CLFR and crash accounting.

Per batch of B queries, each with its positive and n negatives (sparse vectors from ``model.encode_sparse``,
whose backward is sparse -- no (batch x length x vocab) logits are kept):

    loss = InfoNCE_tau(q, d)  +  lambda_d * R(d)  +  lambda_q * R(q)  +  w_ac * AC(d)

R is L1 FLOPS (default) or the classic squared FLOPS, AC the anti-collapse term (formulas in
:mod:`fles1.training.regularizers`, :mod:`fles1.training.losses`); lambda_d is CLFR's (:mod:`fles1.training.clfr`).
Logged every ``logging_steps``, averaged over the window and over all ranks: ``loss_contrastive``,
``loss_reg_d`` (= lambda_d * R(d), the term as added to the loss), ``loss_reg_q``, ``loss_anticollapse``
(= w_ac * AC(d)), ``nnz_doc`` / ``nnz_query`` (mean entries > 0 per vector), ``lambda_d``, ``lambda_q``,
``eff_reg`` (sum of lambda_d over steps).

Example::

    from transformers import TrainingArguments
    from fles1.training.clfr import CLFRCallback, CLFRController
    from fles1.training.data import load_training_examples
    from fles1.training.run import load_model_for_training
    from fles1.training.trainer import FLES1Trainer

    model, tokenizer = load_model_for_training("../shared/models/splade-tiny")
    trainer = FLES1Trainer(model=model, args=TrainingArguments("out", per_device_train_batch_size=32),
                           train_dataset=load_training_examples("../shared/data/nfcorpus"),
                           processing_class=tokenizer, clfr=CLFRCallback(CLFRController(3e-5, 400, 0.1)))
    trainer.train()
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import types
import warnings
import zipfile
from collections.abc import Sequence

import torch
from transformers import Trainer
from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import sort_checkpoints

from configuration_fles1 import check_max_length
from fles1.checkpoint import save_checkpoint
from fles1_encoder import CheckpointError, _read_json_or_none, check_safetensors_header, safetensors_files

from .checks import is_int, is_number
from .clfr import STATE_FILE as CLFR_STATE_FILE
from .clfr import CLFRCallback
from .crashes import STATE_FILE as CRASH_STATE_FILE
from .crashes import CrashMonitor
from .log_window import STATE_FILE as LOG_WINDOW_STATE_FILE
from .distributed import world_size
from .log_window import LogWindow
from .losses import info_nce
from .regularizers import anti_collapse, get_regularizer


# Padded lengths on CUDA are rounded up to this: <= 4 document shapes at 256 tokens (see FLES1Collator).
GPU_PAD_TO_MULTIPLE_OF = 64


class FLES1Collator:
    """Tokenizes (query, positive, negative_1..n) rows into a query batch and a query-major document batch.

    ``pad_to_multiple_of`` rounds each batch's padded length up: on a GPU a handful of distinct shapes lets kernel
    plans (cuDNN attention graphs) and allocator blocks be reused instead of rebuilt for every new length.
    """

    def __init__(self, tokenizer, query_max_length: int, document_max_length: int, pad_to_multiple_of: int | None = None):
        self.tokenizer = tokenizer
        self.query_max_length = query_max_length
        self.document_max_length = document_max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict:
        # positive first, then negative_1..n
        document_columns = [key for key in rows[0] if key == "positive" or key.startswith("negative_")]
        queries = [row["query"] for row in rows]
        documents = [row[key] for row in rows for key in document_columns]
        tokenize = lambda texts, length: self.tokenizer(  # noqa: E731
            texts, padding=True, truncation=True, max_length=length, return_tensors="pt",
            # transformers refuses a max length that is not a multiple of it: then lengths stay as they are
            pad_to_multiple_of=self.pad_to_multiple_of if length % (self.pad_to_multiple_of or length) == 0 else None,
        )
        batch = {
            "query": dict(tokenize(queries, self.query_max_length)),
            "documents": dict(tokenize(documents, self.document_max_length)),
        }
        if "relevance" in rows[0]:
            batch["relevance"] = [row["relevance"] for row in rows]  # for the mask over all ranks' documents
            batch["false_negatives"] = false_negative_mask(batch["relevance"])
        return batch


def false_negative_mask(relevance: list[dict], documents: list[str] | None = None, offset: int = 0) -> torch.Tensor:
    """(B, len(documents)) bool: document j is judged relevant to query i but is not i's own positive (row
    ``offset + i * group``). ``documents``: the ids of the score matrix's rows, by default this batch's."""
    if documents is None:
        documents = [doc_id for item in relevance for doc_id in item["documents"]]
    group = len(relevance[0]["documents"])
    mask = torch.zeros(len(relevance), len(documents), dtype=torch.bool)
    for i, item in enumerate(relevance):
        relevant = set(item["relevant"])
        for j, doc_id in enumerate(documents):
            mask[i, j] = doc_id in relevant and j != offset + i * group
    return mask


def _gather_rows(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows, concatenated (autograd reaches each rank's own through the gather), and where this rank's
    start. Ranks may hold different batch sizes (an epoch's last batch with accelerate's even_batches off): the
    gather needs one shape, so rows are padded to the largest and the padding dropped after."""
    import torch.distributed as dist
    from sentence_transformers.util.distributed import all_gather_with_grad

    sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=rows.device))
    sizes = [int(size) for size in sizes]
    largest = max(sizes)
    if all(size == largest for size in sizes):
        return all_gather_with_grad(rows), dist.get_rank() * largest
    gathered = all_gather_with_grad(torch.nn.functional.pad(rows, (0, 0, 0, largest - rows.shape[0])))
    everything = torch.cat([gathered[rank * largest : rank * largest + size] for rank, size in enumerate(sizes)])
    return everything, sum(sizes[: dist.get_rank()])


def _across_ranks(documents, relevance):
    """Every rank's documents (`_gather_rows`), where this rank's start, and the false-negative mask over them
    (None without relevance judgements)."""
    import torch.distributed as dist

    everything, offset = _gather_rows(documents)
    mask = None
    if relevance is not None:
        ids = [None] * dist.get_world_size()
        dist.all_gather_object(ids, [doc_id for item in relevance for doc_id in item["documents"]])
        mask = false_negative_mask(relevance, [doc_id for rank_ids in ids for doc_id in rank_ids], offset)
    return everything, offset, mask



def _encode_pair(model, query: dict, documents: dict):
    return model.encode_sparse(**query).sparse_embeddings, model.encode_sparse(**documents).sparse_embeddings


@contextlib.contextmanager
def _forward_as_encode_pair(module):
    """Make ``module.forward`` encode (query, documents) for the duration, so a DDP wrapper's forward (which arms
    its gradient all-reduce) runs our encoding; restores whatever forward the instance had (accelerate patches)."""
    saved = module.__dict__.get("forward")
    module.forward = types.MethodType(_encode_pair, module)
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


# each callback state file -> the test of its contents (what the callback's load_state_dict reads)
STATE_READERS = {callback.STATE_FILE: callback.readable_state for callback in (CLFRCallback, CrashMonitor, LogWindow)}


def _is_dict(value) -> bool:  # config.json
    return isinstance(value, dict)


def resolve_resume(resume_from_checkpoint, output_dir: str, state_files: Sequence[str] = (),
                   optimizer_state: bool = False, world_size: int = 1):
    """``True`` -> the newest complete checkpoint-* in output_dir; a folder -> itself, if complete. Complete: it holds
    `state_files` (the callbacks' states, written first), trainer_state.json (transformers' last file) and, with
    `optimizer_state` (a run not saving with save_only_model), the optimizer and scheduler states and RNG states
    (those of a run of `world_size` processes named where there are none). A newer
    checkpoint that a kill interrupted while saving (or that lost a file since) is skipped, with a warning. Else a
    ValueError naming the folder (train_fles1.py checks before loading anything)."""
    required = (TRAINER_STATE_NAME, *state_files)
    # one per process; transformers skips a missing one with an info line (that process's RNG starts over)
    rng_names = rng_state_files(world_size)

    def missing(folder: str) -> list[str]:
        absent = [name for name in required if not os.path.isfile(os.path.join(folder, name))]
        if optimizer_state:  # transformers resumes without them silently: optimizer, schedule and RNG start over
            # the RNG states saved (one per process in DDP): another set than this run's -- a kill between two
            # ranks' saves, a run resumed on another number of processes -- is resumed with a warning
            # (`check_resumable`): transformers then restores the optimizer and schedule but not each RNG
            saved = saved_rng_states(folder)
            rng_files = [(name, (name,)) for name in saved] or [(" / ".join(rng_names), rng_names)]
            for shown, names in ((OPTIMIZER_NAME, (OPTIMIZER_NAME, OPTIMIZER_NAME_BIN)),
                                 (SCHEDULER_NAME, (SCHEDULER_NAME,)), *rng_files):
                found = [name for name in names if os.path.isfile(os.path.join(folder, name))]
                if not found:
                    absent.append(shown)
                # torch.save writes zip files with a CRC per member, which torch.load does not check: a file cut
                # short was a traceback inside train(), one garbled inside resumed with NaN optimizer states
                absent += [f"readable {name}" for name in found if not _zip_intact(os.path.join(folder, name))]
        try:
            weights = safetensors_files(folder)
        except CheckpointError:  # transformers would load a pytorch_model.bin instead (or a shard would be missing)
            absent.append("model.safetensors -- weights are resumed from safetensors only")
        else:
            absent += [f"readable {os.path.basename(path)}" for path in weights if not _safetensors_readable(path)]
        if not absent:  # transformers writes trainer_state.json in place: a kill cuts it short; the callbacks'
            # states and config.json were a traceback when they did not parse
            state = _read_json_or_none(os.path.join(folder, TRAINER_STATE_NAME))
            if not (isinstance(state, dict) and is_int(state.get("global_step"))):
                absent.append(f"readable {TRAINER_STATE_NAME}")
            states = dict.fromkeys((*state_files, LOG_WINDOW_STATE_FILE, "config.json"))
            absent += [f"readable {name}" for name in states if os.path.isfile(os.path.join(folder, name))
                       and not STATE_READERS.get(name, _is_dict)(_read_json_or_none(os.path.join(folder, name)))]
        return absent

    if resume_from_checkpoint is True:
        newest_first = sort_checkpoints(output_dir)[::-1]  # transformers' own order (by step)
        if not newest_first:
            raise ValueError(f"nothing to resume: {output_dir} holds no checkpoint-* folder (start without "
                             "resuming -- with --overwrite if it holds an earlier run's model -- or name a checkpoint "
                             "folder)")
        for position, folder in enumerate(newest_first):
            if not missing(folder):
                for skipped in newest_first[:position]:
                    warnings.warn(f"{skipped} is incomplete (no {', '.join(missing(skipped))}: interrupted while "
                                  f"saving, or a file removed since); resuming from {folder}", stacklevel=2)
                return folder
        expected = [*required, "model.safetensors"] + (
            [OPTIMIZER_NAME, SCHEDULER_NAME, *rng_names] if optimizer_state else [])
        raise ValueError(f"nothing to resume: no checkpoint-* folder in {output_dir} is complete (each lacks one of "
                         f"{', '.join(expected)}, or holds a damaged one); start the run again (train_fles1.py "
                         "--overwrite replaces the folder)")
    absent = missing(resume_from_checkpoint) if resume_from_checkpoint else []
    if absent:
        model_only = all(name.split()[-1].startswith(("optimizer.", "scheduler.", "rng_state")) for name in absent)
        raise ValueError(f"cannot resume from {resume_from_checkpoint}: not a complete training checkpoint folder "
                         f"(no {', '.join(absent)})" + (
                             "; a resume restores the optimizer, learning-rate schedule and RNG from them: start a "
                             f"new run from its weights (--model {resume_from_checkpoint})" if model_only else ""))
    return resume_from_checkpoint


def rng_state_files(world_size: int) -> list[str]:
    """The RNG state files transformers writes for a run of `world_size` processes (one per rank in DDP)."""
    return ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]


def saved_rng_states(folder: str) -> list[str]:
    """The RNG state files in a checkpoint folder."""
    return sorted(name for name in os.listdir(folder) if re.fullmatch(r"rng_state(_\d+)?\.pth", name)) \
        if os.path.isdir(folder) else []


def _safetensors_readable(path: str) -> bool:
    try:
        check_safetensors_header(path)
    except CheckpointError:
        return False
    return True


def _zip_intact(path: str) -> bool:
    """A torch.save file whose zip directory reads and whose members match their CRCs (a member saved without one,
    `torch.serialization.set_crc32_options(False)`, is read, not checked). Checked once per process for the same
    file (path, size, modification time): a resume resolves its checkpoint more than once."""
    try:
        status = os.stat(path)
    except OSError:
        return False
    key = (os.path.realpath(path), status.st_size, status.st_mtime_ns)
    if key not in _ZIPS_INTACT:
        try:
            with zipfile.ZipFile(path) as archive:
                for member in archive.infolist():
                    if member.CRC == 0 and member.file_size:  # no CRC recorded: zipfile would call it corrupt
                        continue
                    with archive.open(member) as handle:  # zipfile checks the CRC at the member's end
                        while handle.read(1 << 24):
                            pass
            _ZIPS_INTACT[key] = True
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
            _ZIPS_INTACT[key] = False
    return _ZIPS_INTACT[key]


_ZIPS_INTACT: dict[tuple, bool] = {}


# the loss and its parts, as compute_loss sums them into the log window (a batch mean each), and its counts
WINDOW_LOSSES = ("loss", "loss_contrastive", "loss_reg_d", "loss_reg_q", "loss_anticollapse")
WINDOW_COUNTS = ("steps", "non_finite_batches", "nnz_doc_sum", "docs", "nnz_query_sum", "queries")


def checkpoint_state_files(clfr: bool) -> list[str]:
    """What the callbacks add to each checkpoint (before trainer_state.json): a complete checkpoint holds them."""
    return [CRASH_STATE_FILE] + ([CLFR_STATE_FILE] if clfr else [])


def check_loss_settings(temperature, lambda_d, lambda_q, anticollapse_weight, anticollapse_min_mass) -> None:
    """The loss's numbers as FLES1Trainer takes them (NaN, inf, bools and non-numbers refused: an inf temperature
    flattens the loss, an inf weight makes every step's loss inf); ValueError naming the first bad one."""
    for name, value, positive in (("temperature", temperature, True), ("lambda_d", lambda_d, False),
                                  ("lambda_q", lambda_q, False), ("anticollapse_weight", anticollapse_weight, False),
                                  ("anticollapse_min_mass", anticollapse_min_mass, True)):
        if not is_number(value, finite=True) or not (value > 0 if positive else value >= 0):
            raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def check_batch_fits(args, num_examples: int) -> None:
    """ValueError when one global batch (per-device batch x ranks) needs more examples than the dataset has."""
    world = max(1, args.world_size)
    if args.per_device_train_batch_size * world > num_examples:
        raise ValueError(f"batch size {args.per_device_train_batch_size} x {world} rank(s) is larger than the dataset "
                         f"({num_examples} examples)")


def check_one_process_per_gpu(args) -> None:
    """ValueError when one process sees several GPUs: transformers' Trainer would wrap the model in DataParallel,
    which hides `encode_sparse` (an AttributeError at step 1) and would split each batch's in-batch negatives
    across GPUs; DDP (torchrun) trains what one process with the global batch does."""
    if args.n_gpu > 1:
        raise ValueError(f"{args.n_gpu} GPUs are visible to one process: train one process per GPU (torchrun "
                         f"--nproc_per_node {args.n_gpu} train_fles1.py ...), or on one GPU (CUDA_VISIBLE_DEVICES=0)")


def tied_weight_names(model) -> set:
    """Parameters that are another one (the decoder is the word embeddings): saved once, under the other's name."""
    return set(getattr(model, "_tied_weights_keys", None) or ())


class FLES1Trainer(Trainer):
    """Trainer for FLES-1 sparse encoders; ``model`` is a ``FLES1ForMaskedLM``.

    Args:
        lambda_d: fixed document regularization weight, used when ``clfr`` is None.
        lambda_q: query regularization weight (0 disables it).
        regularizer: ``"l1_flops"`` (FLES-1) or ``"flops"`` (classic squared FLOPS).
        temperature: InfoNCE temperature tau.
        gather_across_devices: under DDP, score each query against every rank's documents (and regularize them
            together), so N processes x batch B train what one process x batch N*B does -- except at an epoch's
            end, where accelerate fills the ranks' last batches from the epoch's start (``dataloader_drop_last``
            avoids that); False keeps each rank's in-batch negatives to its own batch (cheaper: no all-gather of the
            (B * group, vocab) vectors). Gradient accumulation never widens the negatives: each micro-batch is its
            own batch.
        anticollapse_weight, anticollapse_min_mass: w_ac and m of the anti-collapse term.
        clfr: a :class:`~fles1.training.clfr.CLFRCallback` steering lambda_d (added to the callbacks).
        crash_monitor: a :class:`~fles1.training.crashes.CrashMonitor` (default one if None).
        query_max_length, document_max_length: default to the model config's.

    On CUDA the default collator rounds padded lengths up to a multiple of ``GPU_PAD_TO_MULTIPLE_OF`` (64), so
    that attention plans and allocator blocks are reused across steps; pass ``data_collator`` to choose otherwise.
    """

    def __init__(
        self,
        model=None,
        args=None,
        train_dataset=None,
        processing_class=None,
        lambda_d: float = 3e-5,
        lambda_q: float = 0.0,
        regularizer: str = "l1_flops",
        temperature: float = 0.05,
        anticollapse_weight: float = 1.0,
        anticollapse_min_mass: float = 5.0,
        gather_across_devices: bool = True,
        clfr: CLFRCallback | None = None,
        crash_monitor: CrashMonitor | None = None,
        query_max_length: int | None = None,
        document_max_length: int | None = None,
        callbacks=None,
        **kwargs,
    ):
        if train_dataset is None or len(train_dataset) == 0:
            raise ValueError("train_dataset is empty: FLES1Trainer needs (query, positive, negatives...) rows")
        if not hasattr(model, "encode_sparse"):
            raise TypeError(f"model must be a FLES1ForMaskedLM (with encode_sparse), got {type(model).__name__}")
        check_loss_settings(temperature, lambda_d, lambda_q, anticollapse_weight, anticollapse_min_mass)
        self.regularizer = get_regularizer(regularizer)
        self.lambda_d, self.lambda_q, self.temperature = float(lambda_d), float(lambda_q), float(temperature)
        self.anticollapse_weight, self.anticollapse_min_mass = float(anticollapse_weight), float(anticollapse_min_mass)
        if not isinstance(gather_across_devices, bool):
            raise ValueError(f"gather_across_devices must be True or False, got {gather_across_devices!r}")
        self.gather_across_devices = gather_across_devices
        self.clfr = clfr
        self.crash_monitor = crash_monitor or CrashMonitor()
        # saved with each checkpoint: a resumed run's first row covers its whole window
        self.log_window = LogWindow(WINDOW_LOSSES + WINDOW_COUNTS)
        callbacks = list(callbacks or []) + [self.crash_monitor, self.log_window] + ([clfr] if clfr is not None else [])
        if args is not None:
            args.remove_unused_columns = False  # the collator needs the text columns
            check_batch_fits(args, len(train_dataset))
            check_one_process_per_gpu(args)
        config = model.config
        # a recipe's lengths override the config's; checked now, not at the first long batch hours in
        query_max_length = check_max_length(
            "query_max_length", config.query_max_length if query_max_length is None else query_max_length,
            config.max_position_embeddings)
        document_max_length = check_max_length(
            "document_max_length", config.document_max_length if document_max_length is None else document_max_length,
            config.max_position_embeddings)
        data_collator = kwargs.pop("data_collator", None) or FLES1Collator(
            processing_class,
            query_max_length,
            document_max_length,
            pad_to_multiple_of=GPU_PAD_TO_MULTIPLE_OF if args is not None and args.device.type == "cuda" else None,
        )
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
            data_collator=data_collator, callbacks=callbacks, **kwargs,
        )
        self.loss_is_scaled_for_ga = False  # compute_loss returns a batch mean: the Trainer divides by GA steps
        self.nnz_trace: list[dict] = []  # this rank's per-micro-batch document non-zeros (DDP checks)

    def current_lambda_d(self) -> float:
        return self.clfr.lambda_d if self.clfr is not None else self.lambda_d

    def autocast_smart_context_manager(self, cache_enabled=True):
        # encode_sparse is not the model's forward, so accelerate's forward-level autocast does not reach it
        if self.args.bf16:
            return torch.autocast(self.args.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return contextlib.nullcontext()

    def encode(self, model, query: dict, documents: dict):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            with _forward_as_encode_pair(model.module):
                return model(query=query, documents=documents)
        return _encode_pair(model, query, documents)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        queries, documents = self.encode(model, inputs["query"], inputs["documents"])
        group_size = documents.shape[0] // queries.shape[0]
        lambda_d = self.current_lambda_d()
        # Under DDP every term is taken over all ranks' vectors: each rank's gradient then reaches the others'
        # through the gather, and DDP's mean over ranks of those sums is the one-process gradient of the global batch.
        everything, offset, false_negatives = documents, None, inputs.get("false_negatives")
        if self.gather_across_devices and model.training and world_size() > 1:
            everything, offset, false_negatives = _across_ranks(documents, inputs.get("relevance"))
        contrastive = info_nce(queries, everything, group_size, self.temperature, false_negatives, offset)
        reg_d = lambda_d * self.regularizer(everything)
        all_queries = queries
        if self.lambda_q and offset is not None:
            all_queries = _gather_rows(queries)[0]
        reg_q = self.lambda_q * self.regularizer(all_queries) if self.lambda_q else queries.new_zeros(())
        anticollapse = (
            self.anticollapse_weight * anti_collapse(everything, self.anticollapse_min_mass)
            if self.anticollapse_weight else documents.new_zeros(())
        )
        loss = contrastive + reg_d + reg_q + anticollapse
        with torch.no_grad():
            nnz_doc = float((documents > 0).sum())
            nnz_query = float((queries > 0).sum())
            parts = torch.stack([loss, contrastive, reg_d, reg_q, anticollapse]).float().tolist()
        num_docs, num_queries = documents.shape[0], queries.shape[0]
        if not model.training:  # an evaluation batch (Trainer's prediction_step): no training bookkeeping
            return (loss, {"queries": queries, "documents": documents}) if return_outputs else loss
        self._lambda_d_used = lambda_d  # CLFR may change lambda_d at this step's end; the log row shows this one
        if self.clfr is not None and math.isfinite(parts[0]):  # NaN documents have no entry > 0: not a density
            self.clfr.observe(nnz_doc, num_docs)
        self.crash_monitor.observe(parts[0], nnz_doc, num_docs)
        self.nnz_trace.append({"step": self.state.global_step + 1, "nnz_sum": nnz_doc, "count": num_docs,
                               "ddp": isinstance(model, torch.nn.parallel.DistributedDataParallel)})
        window = self.log_window
        # weighted as transformers weights "loss": each micro-batch by 1 / the micro-batches of its optimizer step
        # (fewer in an epoch's last step), the sum then divided by the steps; a plain mean over micro-batches made
        # the logged parts disagree with the logged loss (loss_contrastive above loss)
        weight = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        counts = (weight, not math.isfinite(parts[0]), nnz_doc, num_docs, nnz_query, num_queries)
        for name, value in zip(WINDOW_LOSSES + WINDOW_COUNTS, [part * weight for part in parts] + list(counts)):
            window.add(name, value)
        return (loss, {"queries": queries, "documents": documents}) if return_outputs else loss

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs:  # a training log (not the end-of-training summary): add the window's FLES-1 metrics
            totals = self.log_window.take(self.args.device)
            steps = totals["steps"] or 1.0
            # the loss too is the window's: transformers' own total restarts at a resumed step, so the first row
            # after a resume averaged fewer steps than the uninterrupted run's row
            for name in WINDOW_LOSSES:
                logs[name] = totals[name] / steps
            if totals["non_finite_batches"]:
                # NaN, not inf (an inf batch): the row says the window diverged; the crash monitor skipped those
                # updates (transformers' logging_nan_inf_filter would show the finite batches' mean instead)
                logs["loss"] = float("nan")
            logs["nnz_doc"] = totals["nnz_doc_sum"] / max(totals["docs"], 1.0)
            logs["nnz_query"] = totals["nnz_query_sum"] / max(totals["queries"], 1.0)
            logs["lambda_d"] = getattr(self, "_lambda_d_used", self.current_lambda_d())
            logs["lambda_q"] = self.lambda_q
            logs["eff_reg"] = self.clfr.eff_reg if self.clfr is not None else self.lambda_d * self.state.global_step
        super().log(logs, start_time)

    @property
    def checkpoint_state_files(self) -> list[str]:
        return checkpoint_state_files(self.clfr is not None)

    def train(self, resume_from_checkpoint=None, **kwargs):
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir,
                                                self.checkpoint_state_files, not self.args.save_only_model,
                                                self.args.world_size)
        for callback in (self.clfr, self.crash_monitor, self.log_window):
            if callback is not None:
                callback.resume_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def restore_finished(self, checkpoint: str) -> None:
        """Take up a run whose last checkpoint is `checkpoint` without training: its weights, trainer state (the
        log history) and CLFR / crash states, as they were when the run ended. For a run killed while writing
        its final folder, log or plots after that checkpoint (train() writes them from here)."""
        from transformers.trainer_callback import TrainerState

        self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        self._load_from_checkpoint(checkpoint)
        for callback in (self.clfr, self.crash_monitor):
            if callback is not None:
                callback.resume_from = checkpoint
                if not callback.restore(self.args, self.state):
                    raise FileNotFoundError(f"{os.path.join(checkpoint, callback.STATE_FILE)}: missing")

    def _load_optimizer_and_scheduler(self, checkpoint):
        """transformers before ~5.2x mapped a multi-process CPU run's optimizer state to ``args.device``, "cpu:0",
        which torch.load cannot restore to: a two-rank CPU resume failed on the floor (5.9). Load to plain "cpu",
        as later transformers does."""
        if checkpoint is None or self.args.world_size == 1 or self.args.device.type != "cpu":
            return super()._load_optimizer_and_scheduler(checkpoint)
        load = torch.load

        def load_to_cpu(*args, **kwargs):
            if str(kwargs.get("map_location", "")).startswith("cpu"):
                kwargs["map_location"] = "cpu"
            return load(*args, **kwargs)

        torch.load = load_to_cpu  # transformers calls torch.load by attribute; put back at once
        try:
            return super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            torch.load = load

    def _issue_warnings_after_load(self, load_result) -> None:
        """A checkpoint holds tied weights once (the decoder is the word embeddings, its bias the head's): their
        keys are not missing, and transformers' "missing keys" warning on every resume said they were."""
        tied = tied_weight_names(self.model)
        missing = [key for key in load_result.missing_keys if key not in tied]
        if len(missing) < len(load_result.missing_keys):
            self.model.tie_weights()
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Every checkpoint is a complete FLES-1 checkpoint folder (fles1.checkpoint.save_checkpoint)."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        save_checkpoint(self.accelerator.unwrap_model(self.model), self.processing_class, output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
