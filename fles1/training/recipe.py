"""Training recipes: YAML files with sections ``model``, ``data``, ``loss``, ``clfr``, ``crashes`` and ``training``
(the last passed to ``transformers.TrainingArguments`` as is). :func:`load_recipe` fills defaults and validates, so
a bad value fails before any model is loaded."""

from __future__ import annotations

import copy
import math
import os
import re

import yaml

from .checks import check_count_or_none, is_int, is_number

DEFAULTS = {
    "model": {"path": None, "query_max_length": None, "document_max_length": None},
    "data": {"source": None, "split": "train", "num_negatives": 7, "seed": 0, "max_examples": None,
             "mask_false_negatives": False, "positive": "random"},
    "loss": {"temperature": 0.05, "regularizer": "l1_flops", "lambda_d": 3e-5, "lambda_q": 0.0,
             "anticollapse_weight": 1.0, "anticollapse_min_mass": 5.0, "gather_across_devices": True},
    "clfr": {"enabled": True, "target_nnz_d": 400, "gain": 0.1, "interval_steps": None, "max_log_step": 1.0},
    "crashes": {"spike_factor": 3.0, "spike_window": 100, "nnz_floor": 1.0, "nnz_collapse_fraction": 0.1},
    "training": {"learning_rate": 2e-5, "per_device_train_batch_size": 32, "num_train_epochs": 2, "seed": 42,
                 "logging_steps": 10, "save_steps": 500, "report_to": "none"},
}


# CLFRController's arguments -> the recipe keys they come from
CLFR_KEYS = {"lambda_d": "loss.lambda_d", "target_nnz": "clfr.target_nnz_d", "gain": "clfr.gain",
             "max_log_step": "clfr.max_log_step"}


def _merge(base: dict, update: dict, where: str = "recipe") -> dict:
    if not isinstance(update, dict):
        raise ValueError(f"{where} must be a mapping of settings, got {_yaml_kind(update)}")
    for key, value in update.items():
        if key not in base and where != "recipe.training":
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {sorted(base)}")
        if isinstance(base.get(key), dict):
            if value is None:  # a section whose keys are all commented out reads as null: its defaults
                continue
            _merge(base[key], value, f"{where}.{key}")
        else:
            base[key] = value
    return base


# PyYAML reads YAML 1.1, where an exponent needs a dot and a signed power: "2e-5" and "1e3" came back as text
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number_or_value(value):
    """A number setting as written: one in exponent form YAML 1.1 read as text becomes that number (file and --set);
    only where a number is expected (a run_name "1e3" stays text)."""
    if not (isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip())):
        return value
    number = float(value)
    return int(number) if number.is_integer() and "." not in value else number  # 1e3: a count, as written


# the recipe's number settings outside `training` (whose TrainingArguments types say which are numbers)
NUMBER_SETTINGS = [(section, key) for section, values in DEFAULTS.items() if section != "training"
                   for key, value in values.items() if is_number(value)] + \
    [("data", "max_examples"), ("clfr", "interval_steps"), ("model", "query_max_length"),
     ("model", "document_max_length")]


def parse_overrides(items) -> dict:
    """``--set SECTION.KEY=VALUE`` items -> {dotted key: value}, each value read as YAML (ValueError naming it)."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"--set {item!r}: the value is not valid YAML{yaml_problem(error)}") from None
    return overrides


def _yaml_kind(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def set_value(recipe: dict, dotted: str, value) -> None:
    """``set_value(recipe, "clfr.target_nnz_d", 120)``."""
    section, _, key = dotted.partition(".")
    if section not in recipe or not key:
        raise ValueError(f"{dotted!r}: expected SECTION.KEY with SECTION one of {sorted(recipe)}")
    _merge(recipe, {section: {key: value}})


def training_arguments(training: dict, output_dir: str | None = None):
    """transformers.TrainingArguments from a recipe's training section (as is, plus this machine's defaults)."""
    import torch
    from transformers import TrainingArguments

    training = dict(training)
    if "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        training.setdefault("use_cpu", True)  # accelerate only sets up CPU DDP (gloo) when told it is on CPU
    # encode_sparse uses every parameter: transformers' default (True) costs an extra graph pass per step under DDP
    # and makes the reducer warn on every run
    training.setdefault("ddp_find_unused_parameters", False)
    if not torch.cuda.is_available():
        training.setdefault("dataloader_pin_memory", False)  # nothing to pin for; torch warns on every run
    return TrainingArguments(output_dir=output_dir, remove_unused_columns=False, **training)


# Counts TrainingArguments lets through: -1 logging/save steps, 0 save steps (saves never), -1 workers (a ValueError
# inside trainer.train()), save_total_limit 0 (keeps every checkpoint), max_steps -5 (as -1: the epochs decide).
_TRAINING_RANGES = {
    "per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),  # 0: ZeroDivisionError at step 1
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "logging_steps": (lambda v: v > 0, "> 0 (below 1: a fraction of the run's steps)"),
    "save_steps": (lambda v: v > 0, "> 0 (below 1: a fraction of the run's steps)"),
    "save_total_limit": (lambda v: v is None or v >= 1, ">= 1, or null (every checkpoint is kept)"),
    "max_steps": (lambda v: v == -1 or v >= 1, ">= 1, or -1 (num_train_epochs decides)"),
    "dataloader_num_workers": (lambda v: v >= 0, ">= 0"),
    "learning_rate": (lambda v: v >= 0, ">= 0"),  # TrainingArguments takes NaN, and a negative rate ascends
    "num_train_epochs": (lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    # NaN weight decay trained NaN weights and exited 0; torch refused a beta >= 1 only after the model loaded
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_epsilon": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    # transformers clips only when max_grad_norm > 0: NaN or a negative norm turned clipping off without a word
    "max_grad_norm": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
}

# Settings TrainingArguments takes that FLES1Trainer would ignore: it encodes through encode_sparse under its own
# autocast (bf16 only), not the model's forward, and computes its own loss. A run would train without them, silently.
_IGNORED_TRAINING = {
    "fp16": (lambda v: v is True, "FLES-1 trains in float32 or bf16 (training.bf16: true) only: fp16 autocast and "
                                  "loss scaling are not wired into encode_sparse"),
    "torch_compile": (lambda v: v is True, "FLES1Trainer encodes through encode_sparse, not the compiled forward: "
                                           "nothing would be compiled"),
    # transformers turns torch_compile on from either
    **dict.fromkeys(("torch_compile_mode", "torch_compile_backend"), (
        lambda v: v is not None, "it turns torch_compile on, and FLES1Trainer encodes through encode_sparse, not the "
                                 "compiled forward: nothing would be compiled")),
    "use_liger_kernel": (lambda v: v is True, "Liger kernels patch model families' forward (not BERT's, and not "
                                              "encode_sparse, which FLES1Trainer trains through)"),
    # read by example scripts, never by Trainer.train: a run named a checkpoint here and trained from step 1
    "resume_from_checkpoint": (lambda v: v is not None, "train_fles1.py --resume [CHECKPOINT] resumes (the Trainer "
                                                        "never reads this setting)"),
    "do_train": (lambda v: v is False, "train_fles1.py always trains (the Trainer never reads this setting)"),
    "label_smoothing_factor": (lambda v: v != 0, "the FLES-1 loss (InfoNCE, loss.temperature) takes no label "
                                                 "smoothing"),
    "push_to_hub": (lambda v: v is True, "the Trainer would upload the raw output folder; push_fles1.py publishes "
                                         "the trained folder, checked, with its card"),
    "include_num_input_tokens_seen": (lambda v: v not in (False, "no"), "FLES-1 batches hold query and documents, "
                                      "not input_ids: transformers would count 0 tokens (and warn at every step)"),
}
# Settings that need what FLES1Trainer does not have: refused before the model loads, not by transformers after it.
_UNAVAILABLE_TRAINING = {
    "eval_strategy": (lambda v: v != "no", "FLES-1 training runs no evaluation while it trains (no eval dataset); "
                                           "train_fles1.py --eval-dev evaluates the dev split when training ends"),
    "save_strategy": (lambda v: v == "best", "'best' needs evaluations while training, which FLES-1 training does "
                                             "not run; use 'steps' or 'epoch' (--eval-dev evaluates at the end)"),
    "train_sampling_strategy": (lambda v: v in ("group_by_length", "batch_rebalance"),
                                "transformers' length samplers measure input_ids, and FLES-1's rows are texts: use "
                                "'random' or 'sequential'"),
}
# TrainingArguments takes a token; in the recipe it would be written into training_log.json and every checkpoint
TRAINING_SECRETS = ("hub_token",)


def _check_training_arguments(training: dict) -> None:
    """``training`` goes to transformers.TrainingArguments as is: an unknown key, a value of the wrong type or out
    of range, or one TrainingArguments refuses fails here, naming the key, instead of inside transformers after the
    model has loaded."""
    import difflib
    import typing

    from transformers import Trainer, TrainingArguments
    from transformers.integrations import get_available_reporting_integrations

    hints = typing.get_type_hints(TrainingArguments)
    for key, value in training.items():
        if key in TRAINING_SECRETS and value is not None:  # refused without echoing it
            raise ValueError(f"recipe.training.{key}: a token in the recipe would be written into training_log.json "
                             "and every checkpoint (and published with them); training needs none (log in with "
                             "`hf auth login`, or set HF_TOKEN, to push with push_fles1.py)")
        if key == "output_dir":
            raise ValueError("recipe.training.output_dir: the output folder is train_fles1.py's --output-dir")
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else " (see transformers.TrainingArguments)"
            raise ValueError(f"recipe.training: {key!r} is not a TrainingArguments setting{hint}")
        options = typing.get_args(hints[key]) or (hints[key],)  # "int | None" -> (int, NoneType)
        if value is None and type(None) in options:
            continue
        kinds = [kind for kind in options if kind is not type(None)]
        if isinstance(value, bool) and bool not in kinds and any(issubclass(k, str) for k in kinds if
                                                                  isinstance(k, type)):
            # "save_strategy: no" arrives as False (a number setting's true/false gets the type check below)
            raise ValueError(f"recipe.training.{key}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r} "
                             "(YAML 1.1 reads no/off/yes/on as false/true: quote it, e.g. 'no')")
        expected = kinds[0] if len(kinds) == 1 else None  # "str | bool" takes either
        if expected in (int, float):
            value = training[key] = _number_or_value(value)
        if (expected is bool and not isinstance(value, bool)) or (expected is float and not is_number(value)) or \
                (expected is int and not is_int(value)):
            raise ValueError(f"recipe.training.{key}: expected {expected.__name__}, got {value!r}")
    for key, (allowed, wording) in _TRAINING_RANGES.items():
        if key in training and not allowed(training[key]):
            raise ValueError(f"recipe.training.{key} must be {wording}, got {training[key]!r}")
    for key, (ignored, reason) in _IGNORED_TRAINING.items():
        if key in training and ignored(training[key]):
            raise ValueError(f"recipe.training.{key}: {training[key]!r} is not supported: {reason}")
    try:
        args = training_arguments(training)
    except (ValueError, RuntimeError, ImportError) as error:
        raise ValueError(f"recipe.training{_culprit(training)}: {error}") from None
    for key, (unavailable, reason) in _UNAVAILABLE_TRAINING.items():
        value = getattr(args, key, None)
        value = getattr(value, "value", value)  # transformers' enums: IntervalStrategy.NO -> "no"
        if unavailable(value):
            raise ValueError(f"recipe.training.{key}: {value!r} is not supported: {reason}")
    try:  # an optimizer whose package is missing (torchao, bitsandbytes, galore, ...) fails here, not after loading
        Trainer.get_optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError) as error:
        # without a model, LOMO / GaLore / Apollo say they need one (a ValueError): the Trainer passes it
        if isinstance(error, ImportError) or "install" in str(error).lower() or "model" not in str(error).lower():
            optim = getattr(args.optim, "value", args.optim)
            culprit = "optim_args" if training.get("optim_args") is not None else "optim"
            raise ValueError(f"recipe.training.{culprit}: {optim}"
                             f"{f' with {training[culprit]!r}' if culprit == 'optim_args' else ''}: "
                             f"{' '.join(str(error).split())}") from None
    _check_scheduler(args, training)
    available = get_available_reporting_integrations()
    missing = [name for name in args.report_to if name not in available]
    if missing:  # else a RuntimeError (e.g. "WandbCallback requires wandb") once the model has loaded
        raise ValueError(f"recipe.training.report_to: {', '.join(map(str, missing))} is not an installed reporting integration "
                         f"(installed: {', '.join(available) or 'none'}); none reports to training_log.json only")


def _check_scheduler(args, training: dict) -> None:
    """The learning-rate schedule as the Trainer builds it, on a stand-in optimizer: a schedule that needs settings
    of its own (cosine_with_min_lr: min_lr; warmup_stable_decay: num_decay_steps) or a kwarg it does not take was a
    traceback once the model and data had loaded."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    steps = 100
    try:
        get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                      num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    except (TypeError, ValueError, KeyError) as error:
        schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        raise ValueError(f"recipe.training.lr_scheduler_kwargs: {schedule!r} with "
                         f"{training.get('lr_scheduler_kwargs') or {}!r}: {' '.join(str(error).split())} "
                         "(training.lr_scheduler_kwargs takes the schedule's own settings" + (
                             ", e.g. --set 'training.lr_scheduler_kwargs={min_lr_rate: 0.1}'"
                             if "min_lr" in str(error) else "") + ")") from None


def _culprit(training: dict) -> str:
    """".KEY" of the first setting TrainingArguments refuses on its own ("" when only a combination fails)."""
    from transformers import TrainingArguments

    for key, value in training.items():
        try:
            TrainingArguments(**{key: value})
        except (ValueError, RuntimeError, ImportError):
            return f".{key}"
    return ""


def validate(recipe: dict) -> dict:
    from configuration_fles1 import check_max_length

    from .clfr import CLFRController
    from .crashes import CrashMonitor
    from .data import POSITIVE_CHOICES, check_sampling
    from .regularizers import get_regularizer
    from .trainer import check_loss_settings

    for section, key in NUMBER_SETTINGS:
        recipe[section][key] = _number_or_value(recipe[section][key])

    if not recipe["model"]["path"]:
        raise ValueError("recipe.model.path is required (a FLES-1 checkpoint folder or a BERT masked-LM)")
    if not recipe["data"]["source"]:
        raise ValueError("recipe.data.source is required (BEIR folder, hub id or triples TSV)")
    # YAML and --set read 1e3, 7 or null as numbers / None: a folder so named became a TypeError, a split "None.tsv"
    for section, key in (("model", "path"), ("data", "source"), ("data", "split")):
        value = recipe[section][key]
        if not isinstance(value, str) or not value:
            hint = "; a folder named like a number: write it ./NAME" if is_number(value) else ""
            raise ValueError(f"recipe.{section}.{key} must be a non-empty string (a path, hub id or split name), got "
                             f"{value!r}{hint}")
    for key in ("query_max_length", "document_max_length"):  # the model's position limit is checked once it loads
        if recipe["model"][key] is not None:
            check_max_length(f"model.{key}", recipe["model"][key], math.inf)
    _check_training_arguments(recipe["training"])
    clfr, loss = recipe["clfr"], recipe["loss"]
    try:  # the components' own checks, before any data or model is loaded
        get_regularizer(loss["regularizer"])
        check_loss_settings(loss["temperature"], loss["lambda_d"], loss["lambda_q"], loss["anticollapse_weight"],
                            loss["anticollapse_min_mass"])
    except ValueError as error:
        raise ValueError(f"loss.{error}") from None
    try:
        CrashMonitor(**recipe["crashes"])
    except ValueError as error:
        raise ValueError(f"crashes.{error}") from None
    for section, key in (("data", "mask_false_negatives"), ("clfr", "enabled"), ("loss", "gather_across_devices")):
        if not isinstance(recipe[section][key], bool):  # a quoted "no" is truthy
            raise ValueError(f"{section}.{key} must be true or false, got {recipe[section][key]!r}")
    if recipe["data"]["positive"] not in POSITIVE_CHOICES:  # else only checked once the data loads
        raise ValueError(f"data.positive must be one of {list(POSITIVE_CHOICES)}, got {recipe['data']['positive']!r}")
    try:  # else only checked once the data loads, without the section's name
        check_sampling(recipe["data"]["num_negatives"], recipe["data"]["seed"], minimum=0)
    except ValueError as error:
        raise ValueError(f"data.{error}") from None
    check_count_or_none(recipe["data"]["max_examples"], "data.max_examples", "null (every example)")
    # checked with CLFR off too: the training log records them, and turning it on must not find them wrong
    try:
        CLFRController(loss["lambda_d"] if clfr["enabled"] else 1.0, clfr["target_nnz_d"], clfr["gain"],
                       clfr["max_log_step"])
    except ValueError as error:  # named as the recipe's key, not the controller's argument
        argument, _, rest = str(error).partition(" ")
        raise ValueError(f"{CLFR_KEYS[argument]} {rest}") from None
    check_count_or_none(clfr["interval_steps"], "clfr.interval_steps", "null (one epoch)")
    return recipe


def yaml_problem(error) -> str:
    """Where and what a YAML parse error is, as `` at line L, column C: <problem>``."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem or ' '.join(str(error).split())}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, refusing a key given twice in one mapping (YAML keeps the last: `gain: 0.1` then `gain: 1.0`
    trained with 1.0, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # SafeLoader's own error names it
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"while reading a mapping (first {key!r}{seen[key]})", node.start_mark,
                    f"found {key!r} again", key_node.start_mark)
            seen[key] = f" at line {key_node.start_mark.line + 1}"
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | None = None, overrides: dict | None = None) -> dict:
    recipe = copy.deepcopy(DEFAULTS)
    if path:
        with open(path, encoding="utf-8") as handle:
            try:
                document = yaml.load(handle, Loader=_UniqueKeyLoader)
            except yaml.YAMLError as error:  # was a traceback
                raise ValueError(f"{path}: not valid YAML{yaml_problem(error)}") from None
            except UnicodeDecodeError as error:  # the message named no file
                raise ValueError(f"{path}: not UTF-8 text (a byte {error.object[error.start]:#04x}; save it as "
                                 "UTF-8)") from None
        _merge(recipe, {} if document is None else document, where="recipe")  # an empty file: the defaults
    for dotted, value in (overrides or {}).items():
        set_value(recipe, dotted, value)
    return validate(recipe)
