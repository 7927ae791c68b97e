"""One training run from a recipe: data -> model -> FLES1Trainer -> checkpoint folder + training_log.json + plots."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import time
import warnings

import torch
from transformers import TrainerCallback

from fles1.atomic import atomic_write_json, path_within, require_writable, scratch_directory
from fles1_encoder import WEIGHT_FILES

from .checks import is_int
from .clfr import CLFRDiverged, optimizer_steps_per_epoch
from .distributed import launched_world_size
from .plots import PLOT_FILES

HISTORY_KEYS = ("step", "epoch", "loss", "loss_contrastive", "loss_reg_d", "loss_reg_q", "loss_anticollapse",
                "lambda_d", "lambda_q", "nnz_doc", "nnz_query", "eff_reg")


# What a run leaves in its output folder (besides the FLES-1 files its final save rewrites).
# the weights a save writes (sharded too: a folder of shards was replaced without --overwrite)
PREVIOUS_RUN = re.compile(r"checkpoint-\d+|training_log\.json|nnz_trace_rank\d+\.json|" + WEIGHT_FILES.pattern + "|"
                          + "|".join(re.escape(name) for name in PLOT_FILES))


def previous_run(output_dir: str) -> list[str]:
    """What an earlier run (finished or interrupted) left in `output_dir`: a fresh run there would mix with it --
    keep its checkpoints for `--resume` to pick up, and its plots next to the new log."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir) if PREVIOUS_RUN.fullmatch(name))


def remove_previous_run(output_dir: str) -> None:
    """--overwrite: the earlier run's checkpoints, log, plots and traces go (the new run's would mix with them); its
    final model stays until the new run's final save replaces it -- an overwrite interrupted before then leaves the
    old model loadable beside the new run's checkpoints (``--resume`` continues them), not a config without weights."""
    for name in previous_run(output_dir):
        if WEIGHT_FILES.fullmatch(name):
            continue
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


# The recipe a run was started with, in every checkpoint's trainer_state.json (TrainerState.stateful_callbacks),
# for a resume to compare with
RECIPE_STATE_KEY = "fles1/recipe"
# what a resumed run may change: when it ends, and bookkeeping. Anything else would not apply (the optimizer,
# scheduler and CLFR state come from the checkpoint) or would apply from the resumed step only, while the log and
# the card recorded the new value for the whole run.
RESUMABLE_CHANGES = {f"training.{key}" for key in (
    "max_steps", "num_train_epochs", "logging_steps", "logging_strategy", "logging_first_step", "logging_dir",
    "log_level", "log_level_replica", "save_steps", "save_strategy", "save_total_limit", "report_to", "run_name",
    "disable_tqdm", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    # memory only (the same loss and gradients): the fix for an out-of-memory batch part-way through a run
    # (activation_* are the names transformers 5.24 moved to; 5.9 has the gradient_* ones only)
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "activation_checkpointing",
    "activation_checkpointing_kwargs")}
PATH_SETTINGS = ("model.path", "data.source")


def _as_json(value):
    return json.loads(json.dumps(value, default=str))  # YAML reads 2024-01-01 as a date


def _setting(recipe: dict, dotted: str):
    section, _, key = dotted.partition(".")
    return (recipe.get(section) or {}).get(key)


class _RecordRecipe(TrainerCallback):
    """Keeps the run's recipe in its TrainerState, so every checkpoint's trainer_state.json carries it (with the
    folders its paths named, which a resume from another working directory spells otherwise); a resumed run keeps
    the checkpoint's."""

    def __init__(self, recipe: dict):
        paths = {name: _setting(recipe, name) for name in PATH_SETTINGS}
        self.record = {"recipe": _as_json(recipe), "paths": {name: os.path.abspath(path) for name, path in paths.items()
                                                             if isinstance(path, str) and os.path.exists(path)}}

    def on_train_begin(self, args, state, control, **kwargs):
        state.stateful_callbacks.setdefault(RECIPE_STATE_KEY, self.record)


RUNTIME_STATE_KEY = "fles1/train_runtime_s"


class _RecordRuntime(TrainerCallback):
    """The training seconds of the steps a run kept, across resumes: each step leaves the total so far in the
    TrainerState, which every checkpoint saves, and a resumed run counts on from its checkpoint's (a resumed run's
    log counted only its last process: a 12-step run killed and resumed four times showed 3 s). Seconds spent on
    steps an interruption lost (after the last checkpoint) are not counted."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.before = recorded_runtime(state) or 0.0
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        state.stateful_callbacks[RUNTIME_STATE_KEY] = {"seconds": self.before + time.perf_counter() - self.start}


def recorded_runtime(state) -> float | None:
    seconds = (state.stateful_callbacks.get(RUNTIME_STATE_KEY) or {}).get("seconds")
    return float(seconds) if isinstance(seconds, (int, float)) else None


def recipe_changes(saved: dict, recipe: dict) -> list[str]:
    """"section.key old -> new" for each setting `recipe` changes from the one `_RecordRecipe` saved that a resume
    cannot honour. A training key left out counts as TrainingArguments' default; model.path and data.source count
    as the same when they name the same file or folder."""
    import dataclasses

    from transformers import TrainingArguments

    defaults = {field.name: _as_json(field.default) for field in dataclasses.fields(TrainingArguments)
                if field.default is not dataclasses.MISSING}
    before_all, after_all = saved.get("recipe") or {}, _as_json(recipe)
    changes = []
    for section in sorted(set(before_all) | set(after_all)):
        before, after = before_all.get(section) or {}, after_all.get(section) or {}
        fallback = defaults if section == "training" else {}
        for key in sorted(set(before) | set(after)):
            name, old, new = f"{section}.{key}", before.get(key, fallback.get(key)), after.get(key, fallback.get(key))
            if old == new or name in RESUMABLE_CHANGES:
                continue
            was = (saved.get("paths") or {}).get(name)
            if name in PATH_SETTINGS and was and isinstance(new, str) and os.path.exists(was) \
                    and os.path.exists(new) and os.path.samefile(was, new):
                continue
            changes.append(f"{name} {old!r} -> {new!r}")
    return changes


class TrainingSetupError(ValueError):
    """The recipe cannot run as given (bad model or data path, lengths, batch size, nothing to resume): raised
    before any step."""


def load_model_for_training(path: str):
    """(model, tokenizer) of a FLES-1 checkpoint folder, or of any BERT masked-LM (converted on the fly, weights
    from safetensors only)."""
    from transformers import AutoTokenizer

    from fles1.checkpoint import convert, is_fles1_source, load_source_tokenizer
    from fles1_encoder import is_local_path, not_a_folder
    from modeling_fles1 import FLES1ForMaskedLM

    if not os.path.isdir(path) and is_local_path(path):
        raise FileNotFoundError(not_a_folder(path))  # transformers would call the path an invalid repo id
    if is_fles1_source(path):
        model = FLES1ForMaskedLM.from_pretrained(path, use_safetensors=True)
        return model, load_source_tokenizer(path, model.config)
    with scratch_directory("fles1-backbone") as scratch:  # every run used to leave its copy
        try:
            converted = convert(path, os.path.join(scratch, "fles1"))
        except ValueError as error:  # e.g. a BERT without its masked-LM head
            raise ValueError(f"model.path={path!r}: {error}") from error
        model = FLES1ForMaskedLM.from_pretrained(converted, use_safetensors=True)
        model.name_or_path = path  # where the weights came from (its license files go with every checkpoint)
        return model, AutoTokenizer.from_pretrained(converted, config=model.config)  # written here: no code of its own


def build_trainer(recipe: dict, output_dir: str, max_steps: int | None = None, trainer_class=None):
    from .clfr import CLFRCallback, CLFRController
    from .crashes import CrashMonitor
    from .data import load_training_examples
    from .recipe import training_arguments
    from .trainer import FLES1Trainer, check_batch_fits, check_one_process_per_gpu

    trainer_class = trainer_class or FLES1Trainer
    data, loss, clfr_cfg, model_cfg = recipe["data"], recipe["loss"], recipe["clfr"], recipe["model"]
    dataset = load_training_examples(data["source"], data["split"], data["num_negatives"], data["seed"],
                                     with_ids=data["mask_false_negatives"], positive=data["positive"])
    if data["max_examples"] is not None and data["max_examples"] < len(dataset):  # a seeded subset (card: 200K)
        dataset = dataset.shuffle(seed=data["seed"]).select(range(data["max_examples"]))
    training = dict(recipe["training"])
    if max_steps is not None:
        training["max_steps"] = max_steps
    args = training_arguments(training, output_dir)
    # before the model loads (the trainer checks again, for its other callers)
    check_batch_fits(args, len(dataset))
    check_one_process_per_gpu(args)
    model, tokenizer = load_model_for_training(model_cfg["path"])
    clfr = None
    if clfr_cfg["enabled"]:
        controller = CLFRController(loss["lambda_d"], clfr_cfg["target_nnz_d"], clfr_cfg["gain"],
                                    clfr_cfg["max_log_step"])
        clfr = CLFRCallback(controller, clfr_cfg["interval_steps"])
    trainer = trainer_class(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        lambda_d=loss["lambda_d"], lambda_q=loss["lambda_q"], regularizer=loss["regularizer"],
        temperature=loss["temperature"], anticollapse_weight=loss["anticollapse_weight"],
        anticollapse_min_mass=loss["anticollapse_min_mass"], gather_across_devices=loss["gather_across_devices"],
        clfr=clfr,
        crash_monitor=CrashMonitor(**recipe["crashes"]),
        query_max_length=model_cfg["query_max_length"], document_max_length=model_cfg["document_max_length"],
    )
    trainer.add_callback(_RecordRecipe(recipe))
    trainer.add_callback(_RecordRuntime())
    return trainer


def last_step(trainer) -> int:
    """The step the run ends at, as transformers computes it: max_steps, else num_train_epochs x optimizer steps per
    epoch."""
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    with torch.random.fork_rng(devices=[]):  # accelerate seeds a DDP sampler from the global RNG: leave it as it was
        batches = len(trainer.get_train_dataloader())
    return math.ceil(args.num_train_epochs * optimizer_steps_per_epoch(batches, args.gradient_accumulation_steps))


def check_resumable(checkpoint: str, trainer, model_path: str, recipe: dict | None = None,
                    own: bool = False) -> bool:
    """ValueError unless resuming from `checkpoint` trains something: transformers reports weights of another model
    size as a RuntimeError inside trainer.train() (and, strict=False, loads a model of other depth partly), trains
    one step past a finished run, and none before a lower max_steps, logging a global step past it. And unless
    `recipe` is the one the checkpoint's run was started with, up to `RESUMABLE_CHANGES` (a checkpoint written
    before runs recorded their recipe is not compared). True when `checkpoint` is one of the output folder's own
    (`own`) at the run's last step and the run's training_log.json is not written: the run was killed while
    finishing, and only its final folder, plots and log remain to write (`FLES1Trainer.restore_finished`)."""
    from transformers.trainer import TRAINER_STATE_NAME

    from .trainer import rng_state_files, saved_rng_states

    wrong = _misfitting_weights(os.path.join(checkpoint, "model.safetensors"), trainer.model)
    if wrong:
        name, found, expected = wrong[0]
        raise ValueError(f"cannot resume from {checkpoint}: its weights do not fit model.path={model_path!r} "
                         f"({len(wrong)} tensors differ, e.g. {name}: {found} there, {expected} here); resume with "
                         "the model the checkpoint was trained from")
    with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as handle:
        trainer_state = json.load(handle)
    step = trainer_state["global_step"]
    saved = (trainer_state.get("stateful_callbacks") or {}).get(RECIPE_STATE_KEY)
    changes = recipe_changes(saved, recipe) if isinstance(saved, dict) and recipe is not None else []
    if changes:
        shown = "; ".join(changes[:6]) + ("; ..." if len(changes) > 6 else "")
        raise ValueError(f"cannot resume from {checkpoint}: the recipe differs from the one its run was started with "
                         f"({shown}). The optimizer, scheduler and CLFR state come from the checkpoint, so such a "
                         "change would not apply, or only from this step on, while the log recorded it for the whole "
                         f"run: resume with the run's settings (in {TRAINER_STATE_NAME}, key {RECIPE_STATE_KEY!r}), "
                         f"or start a new run from its weights (--model {checkpoint}). Only when the run ends "
                         "(--max-steps, training.max_steps, num_train_epochs), logging/saving settings and gradient "
                         "checkpointing may change")
    end = last_step(trainer)
    if own and step == end and not _finished(trainer.args.output_dir, step):
        return True
    if trainer.args.save_only_model:  # the recipe's, and so the checkpoint's run's (a change is refused above)
        raise ValueError(f"cannot resume from {checkpoint}: its run saved with training.save_only_model, so it holds "
                         "no optimizer, learning-rate schedule or RNG state; a resume would restart them while the log "
                         f"called it one run. Start a new run from its weights (--model {checkpoint})")
    if step >= end:
        raise ValueError(f"cannot resume from {checkpoint}: it is at step {step} and this run ends at step {end} "
                         "(--max-steps, else the recipe's training.max_steps or num_train_epochs): nothing to "
                         "train; a larger --max-steps continues it (see its learning-rate warning)")
    expected, saved = rng_state_files(trainer.args.world_size), saved_rng_states(checkpoint)
    if set(saved) != set(expected):  # transformers skips each missing one with an info line
        warnings.warn(f"{checkpoint} holds the RNG states {', '.join(saved)} and this run of "
                      f"{trainer.args.world_size} process(es) needs {', '.join(expected)}: the optimizer and schedule "
                      "resume, the RNG states of the processes without one do not (dropout, and the data each process "
                      "sees, differ from an uninterrupted run); resume on the number of processes it was saved by "
                      "to continue it exactly" + _global_batch_change(trainer.args, saved))
    planned = trainer_state.get("max_steps")
    schedule = str(getattr(trainer.args.lr_scheduler_type, "value", trainer.args.lr_scheduler_type))
    if is_int(planned) and planned > 0 and planned != end and schedule not in ("constant", "constant_with_warmup"):
        # the optimizer's learning rate comes back from the checkpoint (0 at the end of a linear decay) and drives
        # the next step; the schedule after it is sized for `end` steps: neither run's schedule
        warnings.warn(f"{checkpoint}'s run was scheduled for {planned} steps and this one ends at step {end}: the "
                      f"learning rate resumes from the checkpoint's (step {step + 1} trains at it) and then follows "
                      f"a {schedule} schedule over {end} steps, so the weights will not match "
                      f"a run started with {end} steps; to extend a finished run on a schedule of its own, start a "
                      f"new run from its weights (--model {checkpoint})")
    return False


def _global_batch_change(args, saved_rng_files: list[str]) -> str:
    """The rest of the RNG warning when the checkpoint's run had another number of processes (rng_state_<rank>.pth
    each, rng_state.pth for one): each step's batch -- its in-batch negatives, a one-epoch CLFR interval -- changes."""
    per_process = args.per_device_train_batch_size * args.gradient_accumulation_steps
    ranks = [int(name[len("rng_state_"):-len(".pth")]) for name in saved_rng_files if name.startswith("rng_state_")]
    saved_processes = max(ranks) + 1 if ranks else len(saved_rng_files)
    if saved_processes in (0, args.world_size):
        return ""
    return (f". Each step now trains {per_process * args.world_size} queries instead of "
            f"{per_process * saved_processes} (with their documents: in-batch negatives, unless "
            "loss.gather_across_devices is false; a one-epoch CLFR interval changes with it), while training_log.json "
            "records this run's global batch for the whole run")


def _finished(output_dir: str, step: int) -> bool:
    """Whether the run in `output_dir` wrote its training log at `step` (train() writes it last)."""
    try:
        with open(os.path.join(output_dir, "training_log.json"), encoding="utf-8") as handle:
            return json.load(handle).get("global_step") == step
    except (OSError, ValueError, AttributeError):  # none, cut short, or not a log
        return False


def _misfitting_weights(weights: str, model) -> list[tuple]:
    """(name, shape in `weights`, shape in `model`) per tensor that differs or is only in one ("absent"); reads the
    safetensors header only. No file (another format): [] -- transformers reports what it finds."""
    from safetensors import safe_open

    from .trainer import tied_weight_names

    if not os.path.isfile(weights):
        return []
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    for tied in tied_weight_names(model):  # not saved: they share another tensor
        expected.pop(tied, None)
    with safe_open(weights, "pt") as handle:
        found = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    return [(name, found.get(name, "absent"), expected.get(name, "absent"))
            for name in sorted(found.keys() | expected.keys()) if found.get(name) != expected.get(name)]


def training_log(trainer, recipe: dict, runtime_s: float) -> dict:
    """`runtime_s`: this process's training seconds; the log's train_runtime_s counts every segment of a resumed
    run (`_RecordRuntime`), where the trainer state has the total."""
    history = [
        {key: row.get(key) for key in HISTORY_KEYS}
        for row in trainer.state.log_history if "loss_contrastive" in row
    ]
    clfr, recorded = trainer.clfr, recorded_runtime(trainer.state)
    return {
        "recipe": {**recipe, "resolved": {
            "max_steps": trainer.state.max_steps,
            "clfr_interval_steps": getattr(clfr, "_interval", None),
            "train_examples": len(trainer.train_dataset),
            # torchrun's processes: the batch each step trained on is per_device_train_batch_size times these
            "world_size": trainer.args.world_size,
            "global_batch_size": trainer.args.per_device_train_batch_size * trainer.args.world_size
            * trainer.args.gradient_accumulation_steps,
            # which of them named local files: the card takes the others as Hub ids, wherever it is written
            "local_paths": [key for key, value in (("model.path", recipe["model"]["path"]),
                                                   ("data.source", recipe["data"]["source"]))
                            if isinstance(value, str) and os.path.exists(value)],
        }},
        "seed": trainer.args.seed,
        "global_step": trainer.state.global_step,
        "train_runtime_s": runtime_s if recorded is None else recorded,
        "history": history,
        "clfr": list(clfr.controller.history) if clfr is not None else [],
        "crashes": trainer.crash_monitor.totals(),
        "eval": {},
    }


def check_dev_data(source: str) -> str | None:
    """Before training, for --eval-dev: None when `source` has a BEIR dev split (loaded now: bad dev data fails
    before any step, naming its file and line), else why dev evaluation will be skipped. A hub dataset id is asked
    for its split (a folder test alone called every hub dataset split-less)."""
    from fles1.beir import BEIRSplitError, load_beir

    if os.path.exists(source) and not os.path.isfile(os.path.join(source, "qrels", "dev.tsv")):
        return f"{source}: no BEIR dev split (qrels/dev.tsv); dev evaluation skipped"
    try:
        load_beir(source, "dev")
    except BEIRSplitError as error:
        return f"{error}; dev evaluation skipped"
    return None


def evaluate_dev(output_dir: str, recipe: dict, skipped: str | None = None) -> dict:
    """Dev NDCG@10 & co. of the trained folder via fles1.evaluation (BEIR sources only); `skipped`: why not
    (`check_dev_data`)."""
    source = recipe["data"]["source"]
    if skipped:
        return {"note": skipped}
    try:
        from fles1.evaluation import evaluate
    except ImportError as error:
        return {"note": f"fles1.evaluation unavailable ({error}); dev evaluation skipped"}
    results = evaluate(output_dir, [source], split="dev", bm25=False, production=False, cache_dir=None)
    entry = next(iter(results["datasets"].values()))
    return {"split": "dev", "threshold": results["threshold"], **entry["metrics"]}


def train(recipe: dict, output_dir: str, resume_from_checkpoint=None, max_steps: int | None = None,
          eval_dev: bool = False, trace_nnz: bool = False, trainer_class=None, overwrite: bool = False) -> dict | None:
    """Run the recipe in `output_dir`, which no other run may use meanwhile (`_held_for_this_run`); see `_train`."""
    with _held_for_this_run(output_dir):
        return _train(recipe, output_dir, resume_from_checkpoint, max_steps, eval_dev, trace_nnz, trainer_class,
                      overwrite)


@contextlib.contextmanager
def _held_for_this_run(output_dir: str):
    """An exclusive lock on the output folder itself (flock on its descriptor: no file added to the folder, released
    when the process ends, killed too), taken by the main process. Two runs started into one new folder both found
    it empty and wrote their checkpoints, weights and logs over each other's, and both exited 0."""
    try:
        import fcntl
    except ImportError:  # not POSIX: unguarded
        fcntl = None
    # under DDP rank 0 holds it for all (a refused rank 0 ends the job: torchrun stops the other ranks)
    if fcntl is None or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    created = False
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
        try:
            os.mkdir(output_dir)
            created = True
        except FileExistsError:  # an earlier run's, or one starting this moment: the lock decides
            pass
        descriptor = os.open(output_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # not a folder, not writable: _train's checks name it
        yield
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TrainingSetupError(f"output_dir {output_dir} is in use by another training run (it holds the "
                                     "folder until it ends): wait for it, or choose another --output-dir") from None
        try:
            yield
        except BaseException:
            if created and os.path.isdir(output_dir) and not os.listdir(output_dir):  # made here, nothing written
                with contextlib.suppress(OSError):
                    os.rmdir(output_dir)
            raise
    finally:
        os.close(descriptor)


def _train(recipe: dict, output_dir: str, resume_from_checkpoint=None, max_steps: int | None = None,
           eval_dev: bool = False, trace_nnz: bool = False, trainer_class=None, overwrite: bool = False) -> dict | None:
    """Run the recipe; returns the training log (on the main process; None on other ranks). An `output_dir` that
    holds an earlier run is refused unless resuming it, or `overwrite` (its checkpoints, log and plots are removed
    once the model has loaded, its final model when the new one is saved: `remove_previous_run`). Resuming from a
    checkpoint of another run (a folder that is not one of `output_dir`'s checkpoints) into an `output_dir` holding a
    run is refused unless `overwrite`: the folder's run is then replaced by the continuation. A checkpoint past the
    run's last step, at it once the run is finished, or whose weights do not fit the model, is refused before any
    step; the folder's own checkpoint at its last step, the run killed while writing its final folder, plots or log,
    is finished from there without training."""
    from .plots import write_plots
    from .trainer import checkpoint_state_files, resolve_resume

    created = not os.path.exists(output_dir)
    try:
        require_writable(output_dir, "output_dir", folder=True)  # before any loading, not at the first checkpoint
        earlier = previous_run(output_dir)
        if isinstance(resume_from_checkpoint, str) and not os.path.isdir(resume_from_checkpoint):
            # (else taken below for another run's checkpoint, with advice to --overwrite the folder's run)
            raise ValueError(f"cannot resume from {resume_from_checkpoint}: no such folder")
        if isinstance(resume_from_checkpoint, str) and os.path.realpath(resume_from_checkpoint) == \
                os.path.realpath(output_dir):  # `--resume OUT`: its newest checkpoint, as `--resume` alone (it was
            resume_from_checkpoint = True  # "another run's checkpoint", with --overwrite as the advice)
        own = resume_from_checkpoint is True or isinstance(resume_from_checkpoint, str) and any(
            path_within(resume_from_checkpoint, os.path.join(output_dir, name)) for name in earlier)
        if own:  # one of this folder's checkpoints
            if overwrite:  # it would remove the very checkpoint it continues from
                raise ValueError("--resume continues the run in output_dir, --overwrite replaces it: choose one")
            earlier = []  # continued, not replaced
        elif earlier and not overwrite:
            shown = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
            if resume_from_checkpoint:  # another run's checkpoint
                raise ValueError(f"output_dir {output_dir} holds an earlier run ({shown}); --resume "
                                 f"{resume_from_checkpoint} is another run's checkpoint, and continuing it there would "
                                 "mix the two runs: --overwrite replaces the folder's run with the continuation, or "
                                 "choose another --output-dir")
            if not any(name.startswith("checkpoint-") for name in earlier):  # nothing for --resume to continue
                raise ValueError(f"output_dir {output_dir} holds an earlier run's model ({shown}) and no checkpoint "
                                 "to resume (a finished run whose checkpoints were removed, or an interrupted "
                                 "--overwrite): --overwrite replaces it, or choose another folder")
            raise ValueError(f"output_dir {output_dir} holds an earlier run ({shown}); a new run there would mix "
                             "with it: --resume continues it, --overwrite replaces it, or choose another folder")
        model_path = recipe["model"]["path"]
        removed = [name for name in earlier if isinstance(model_path, str) and os.path.isdir(model_path)
                   and path_within(model_path, os.path.join(output_dir, name))]
        if overwrite and removed:  # loaded, then deleted: every save's license copy looked for it (and warned)
            raise ValueError(f"model.path={model_path!r} is inside output_dir's earlier run ({removed[0]}), which "
                             "--overwrite removes: copy it out of the folder first, or write the new run elsewhere")
        with warnings.catch_warnings():  # nothing to resume fails before any loading; the choice is made below
            warnings.simplefilter("ignore")
            resolve_resume(resume_from_checkpoint, output_dir, checkpoint_state_files(recipe["clfr"]["enabled"]),
                           not recipe["training"].get("save_only_model", False), launched_world_size())
        dev_skipped = check_dev_data(recipe["data"]["source"]) if eval_dev else None
        if dev_skipped:
            warnings.warn(f"--eval-dev: {dev_skipped}")
        trainer = build_trainer(recipe, output_dir, max_steps, trainer_class)
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, output_dir, trainer.checkpoint_state_files,
                                                not trainer.args.save_only_model, trainer.args.world_size)
        unfinished = bool(resume_from_checkpoint) and check_resumable(
            resume_from_checkpoint, trainer, recipe["model"]["path"], recipe, own=own)
    except (ValueError, OSError) as error:  # transformers reports a missing model folder as a bad repo id
        if created and os.path.isdir(output_dir) and not os.listdir(output_dir):  # the Trainer made it
            with contextlib.suppress(OSError):  # another rank removed it first
                os.rmdir(output_dir)
        where = f"model.path={recipe['model']['path']!r}: " if isinstance(error, OSError) else ""
        raise TrainingSetupError(f"{where}{error}") from error
    if earlier:  # --overwrite: after the load, which may read this very folder
        if trainer.is_world_process_zero():
            remove_previous_run(output_dir)
        trainer.accelerator.wait_for_everyone()
    start = time.perf_counter()
    try:
        if unfinished:  # killed after its last checkpoint: write what it did not
            trainer.restore_finished(resume_from_checkpoint)
        else:
            trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except CLFRDiverged as error:  # hours in, maybe: one line, and what is kept
        raise TrainingSetupError(f"CLFR: {error}; the checkpoints so far stay in {output_dir}. Check "
                                 "clfr.target_nnz_d, or lower clfr.gain / clfr.max_log_step in a new run (a resume "
                                 "keeps the run's settings; --model CHECKPOINT starts from its weights)") from None
    except pickle.UnpicklingError as error:  # torch.load(weights_only=True) refused a checkpoint file's objects
        # torch's own message advises weights_only=False, which would run whatever the file holds: not repeated
        refused = [line.strip() for line in str(error).splitlines() if "unsupported" in line.lower()]
        raise TrainingSetupError(f"cannot resume from {resume_from_checkpoint}: one of its files (optimizer.pt, "
                                 "scheduler.pt, rng_state*.pth) holds more than tensors and plain values, and is not "
                                 f"loaded{f' ({refused[0]})' if refused else ''}; resume from another checkpoint"
                                 ) from None
    runtime = time.perf_counter() - start
    if trace_nnz and not unfinished:
        if resume_from_checkpoint:  # the trace lives in memory only: the steps before the checkpoint are not in it
            warnings.warn(f"--trace-nnz: the trace holds only this process's steps (after {resume_from_checkpoint}); "
                          "the steps before it are not in it")
        atomic_write_json(os.path.join(output_dir, f"nnz_trace_rank{trainer.args.process_index}.json"),
                          trainer.nnz_trace, indent=None)
    trainer.save_model(output_dir)
    if not trainer.is_world_process_zero():
        return None
    log = training_log(trainer, recipe, runtime)
    from fles1.evaluation import model_fingerprint  # here: it loads the encoder module

    # the model this log trained, as eval's results name it: the card pairs the two by it
    log["model_fingerprint"] = model_fingerprint(output_dir)
    if unfinished:
        log["finished_from"] = resume_from_checkpoint  # train_runtime_s: the checkpoint's total
    if log["history"]:
        write_plots(log, output_dir)
    _write_log(log, output_dir)  # last: it marks the run finished (`_finished`); before the dev evaluation
    if eval_dev:
        log["eval"] = evaluate_dev(output_dir, recipe, dev_skipped)
        _write_log(log, output_dir)
    return log


def _write_log(log: dict, output_dir: str) -> None:
    # bare NaN is not JSON
    atomic_write_json(os.path.join(output_dir, "training_log.json"), _finite_or_null(log), indent=1, allow_nan=False)


def _finite_or_null(value):
    """`value` with every NaN/inf float (a diverged step's loss) as None: JSON null, which strict parsers take."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value
