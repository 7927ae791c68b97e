"""FLES1Encoder: text -> readable sparse vectors ({'machine': 1.39, ...}) from a FLES-1 checkpoint.

Self-contained (torch, transformers, numpy, tqdm; scipy for CSR output) so it can ship beside the model.

    >>> from fles1_encoder import FLES1Encoder
    >>> encoder = FLES1Encoder.from_pretrained("mindoval/fles1-v14")
    >>> sparse = encoder.encode("What is machine learning?")          # {'machine': 1.39, 'learning': 1.08, ...}
    >>> # (the card's v14 numbers; the converted shipped splade-tiny gives {'machine': 2.62, 'learning': 2.49, ...})
    >>> vectors = encoder.encode_batch(["query 1", "query 2"], batch_size=32)
    >>> ids, weights = encoder.encode_to_ids("What is machine learning?")

Defined results: an empty or whitespace-only text -- or one the tokenizer turns into no tokens at all, e.g. only
zero-width or control characters -- encodes to an empty vector (no model call: BERT would otherwise give its
[CLS]/[SEP] vector to "nothing"); texts longer than the configured max length
(``config.document_max_length`` / ``config.query_max_length`` tokens, special tokens included) are truncated.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import numbers
import operator
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import warnings
from collections.abc import Mapping
from typing import Iterable, Literal, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

Kind = Literal["document", "query"]
PLURALS = {"document": "documents", "query": "queries"}  # progress-bar labels
KINDS = ("document", "query")
OUTPUTS = ("dict", "ids", "csr", "torch")
PROGRESS_BAR_MIN_TEXTS = 256  # below this a bar is noise
# Texts tokenized and sorted by length together, then batched: bounds memory on corpora of any size (a batch never
# spans two windows; up to this many texts are batched exactly as if all were sorted at once).
SORT_WINDOW_TEXTS = 8192
# Texts per call of the Rust tokenizer: its Encoding objects (~60 KB for a 256-token text) live only that long.
TOKENIZE_CHUNK_TEXTS = 1024
# from_pretrained's keyword arguments: where each goes (config settings are consumed by the config, the rest by the
# model)
DOWNLOAD_OPTIONS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies", "subfolder")
TOKENIZER_OPTIONS = ("use_fast",)
# the model's own loading options, never config settings: given to the config, dtype="auto" became config.dtype and
# failed as torch.auto
MODEL_DTYPE_OPTIONS = ("dtype", "torch_dtype")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # a checkpoint folder holds one: the WordPiece vocabulary
FLOAT32_MAX = float(np.finfo(np.float32).max)


class CheckpointError(OSError):
    """A FLES-1 checkpoint folder is missing a file or holds a corrupt one; the message names the file."""


class SparseEncoderMismatchWarning(UserWarning):
    """The checkpoint's sentence-transformers files make SparseEncoder encode otherwise than FLES1Encoder and the
    model (other max lengths, prompts, max_active_dims): the three loaders' vectors differ."""


def is_local_path(name: str) -> bool:
    """Whether `name` is written as a path (absolute, ./, ../ or ~), never a Hub id (``owner/name``)."""
    return os.path.isabs(name) or name.startswith((".", "~"))


def not_a_folder(path: str) -> str:
    """Why a local ``path`` that is not a folder cannot be a checkpoint, for error messages."""
    return "a file, not a folder" if os.path.exists(path) else "no such folder"


def _built_by_bert(key: str) -> bool:
    """The position_ids / token_type_ids buffers: BERT builds them itself, and older files hold them."""
    return key.endswith(("position_ids", "token_type_ids"))


def missing_weights(missing_keys) -> list[str]:
    """The tensors a load's ``missing_keys`` names that transformers started at random, sorted: all but the buffers
    BERT builds itself."""
    return sorted(key for key in missing_keys if not _built_by_bert(key))


def unplaced_weights(unexpected_keys) -> list[str]:
    """The tensors a load's ``unexpected_keys`` names that belong to the parts FLES-1 uses (embeddings, encoder
    layers, MLM head), sorted: a config describing a smaller model than the weights. A BERT's pooler and
    next-sentence head (bert-base-uncased holds them) are no part of a masked-LM; the buffers BERT builds are
    harmless."""
    return sorted(key for key in unexpected_keys if key.startswith(("bert.embeddings.", "bert.encoder.",
                                                                    "cls.predictions.")) and not _built_by_bert(key))


def weights_misfit(loading: dict) -> Optional[str]:
    """How the weights a transformers load read (its ``output_loading_info``, loaded with
    ``ignore_mismatched_sizes=True``) do not fit the model config.json describes, or None: tensors it lacks (started
    at random), holds no place for (dropped: fewer layers) or of other shapes (transformers' RuntimeError named no
    file) -- the vectors would be other ones, silently."""
    def listed(items, shown=4):
        return f"({', '.join(items[:shown])}{', ...' if len(items) > shown else ''})"

    missing, unplaced = missing_weights(loading["missing_keys"]), unplaced_weights(loading["unexpected_keys"])
    mismatched = [f"{key}: {tuple(found)} in the file, {tuple(expected)} in the model"
                  for key, found, expected in sorted(loading.get("mismatched_keys") or (), key=lambda item: item[0])]
    if missing:
        return f"lack {len(missing)} tensor(s) config.json's model has {listed(missing)}"
    if unplaced:
        return f"hold {len(unplaced)} tensor(s) config.json's model has no place for {listed(unplaced)}"
    if mismatched:
        return f"hold {len(mismatched)} tensor(s) of other shapes than config.json's model's {listed(mismatched, 3)}"
    return None


# config settings that change the model's tensors: given to from_pretrained, a misfit is the caller's
SHAPE_SETTINGS = ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings",
                  "type_vocab_size", "embedding_size")


def _weights_do_not_fit(source: str, settings: dict, how: str) -> Exception:
    """The weights of `source` and the model config.json describes (with the caller's `settings`) differ, `how`:
    the caller's SettingError when it gave a setting that shapes the model, else a CheckpointError (a damaged
    folder is not blamed on query_max_length=32)."""
    weights = "the shards model.safetensors.index.json lists" if os.path.isfile(
        os.path.join(source, "model.safetensors.index.json")) else "model.safetensors"
    settings = {key: value for key, value in settings.items() if key in SHAPE_SETTINGS}
    if settings:
        given = ", ".join(f"{key}={value!r}" for key, value in settings.items())
        return SettingError(f"FLES1Encoder.from_pretrained: with {given}, {source}'s weights ({weights}) {how}")
    return CheckpointError(f"{source}: its weights ({weights}) {how}")


class SettingError(ValueError):
    """A setting given to `FLES1Encoder.from_pretrained` that the checkpoint cannot take (the checkpoint is fine)."""


def _config_with(build, given: dict, source: str):
    """``build(**given)``: the config with the caller's settings. A setting it refuses is the caller's
    `SettingError`, when the config builds without them; else config.json is at fault (a `CheckpointError` naming
    it): both were "could not load the FLES-1 model", as if the folder were broken."""
    try:
        return build(**given)
    except (OSError, TypeError):
        raise
    except Exception as error:  # ValueError; huggingface_hub's StrictDataclassError ("hidden_size": "abc")
        reason = " ".join(str(error).split())
        if given:
            try:
                build()
            except Exception:
                pass
            else:
                raise SettingError(f"FLES1Encoder.from_pretrained: {reason}") from None
        raise CheckpointError(f"{source}: config.json: {reason}") from error


def _check_local_checkpoint(path: str) -> None:
    """Fail early, naming the file, instead of deep inside transformers."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: missing; a FLES-1 checkpoint folder needs config.json")
    try:
        with open(config_path, encoding="utf-8") as handle:
            settings = json.load(handle)  # valid JSON, else named here
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path}: not valid JSON ({error})") from error
    if not isinstance(settings, dict):
        raise CheckpointError(f"{config_path}: not a JSON object of settings (a {type(settings).__name__})")
    _warn_if_sentence_transformers_prompts_or_prunes(path)  # the lengths' check once the config is built
    _warn_if_sentence_transformers_pools_otherwise(path)
    for weights_path in safetensors_files(path):
        check_safetensors_header(weights_path)
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise CheckpointError(f"{os.path.join(path, 'tokenizer.json')}: missing (nor is there a vocab.txt); a FLES-1 "
                              "checkpoint folder holds its tokenizer")


def check_safetensors_header(path: str) -> None:
    """CheckpointError naming `path` unless its safetensors header reads and fits the file's size (safetensors
    checks both; no tensor is read): a file cut short fails here, not deep inside a load."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except Exception as error:  # safetensors raises its own error types (not OSErrors)
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error


def _read_json_or_none(path: str):
    """A JSON file of sentence-transformers or the tokenizer, or None: their own loaders report a broken one."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (ValueError, UnicodeDecodeError):
        return None


def write_sentence_transformers_files(folder: str, config) -> type:
    """modules.json & co. in a checkpoint folder that holds the model and tokenizer already, written by
    sentence-transformers itself: Transformer(fill-mask) + SpladePooling(max, relu), cutting queries and documents
    where `config` does. Returns the model class it loaded (remote code: transformers copied it into its modules
    cache)."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    transformer = Transformer(
        folder,
        transformer_task="fill-mask",
        model_kwargs={"trust_remote_code": True},
        config_kwargs={"trust_remote_code": True},
        processor_kwargs={"trust_remote_code": True},
        max_seq_length=config.document_max_length,
        query_length=config.query_max_length,
        document_length=config.document_max_length,
    )
    encoder = SparseEncoder(modules=[transformer, SpladePooling(pooling_strategy="max", activation_function="relu")])
    encoder.save_pretrained(folder, create_model_card=False)
    return type(getattr(transformer, "model", None) or transformer.auto_model)


def drop_loader_flags(path: str) -> None:
    """transformers saves the loading call's ``local_files_only`` and ``is_local`` into tokenizer_config.json (true
    on an offline machine, for a folder); they describe that machine and load, not the tokenizer (transformers
    sets both anew at every load), so they are not shipped."""
    settings = _read_json_or_none(path)
    if not isinstance(settings, dict):
        return
    if [flag for flag in ("local_files_only", "is_local") if settings.pop(flag, None) is not None]:
        _write_json(path, settings)


def _write_json(path: str, value) -> None:
    """`value` as JSON at `path`, replacing it only once complete."""
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    os.replace(partial, path)


SAVE_STAGING_PREFIX = ".fles1-save."  # + writer (host, pid namespace, pid): a save's staging folder in its folder
# the weight files a save writes (no variant: model.safetensors, or shards and their index): an earlier save's that
# this one did not write are removed -- model.safetensors beside a new sharded index is what the loaders read first
WEIGHT_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


@contextlib.contextmanager
def _writing_on_this_rank(model):
    """transformers' save_pretrained writes on rank 0 only once a process group is up (`should_save_on_this_rank`).
    A save here is the calling process's own -- training saves on its saving rank alone, and every rank converts a
    plain BERT backbone into a scratch folder of its own -- so it writes wherever it is called: rank 1's folder was
    left without config.json and weights, and DDP from a BERT backbone failed on every run."""
    if not hasattr(model, "should_save_on_this_rank"):  # transformers without the gate
        yield
        return
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        yield
    finally:  # (two threads saving one model: the first done removes it, the others find it gone)
        model.__dict__.pop("should_save_on_this_rank", None)


def save_checkpoint_folder(folder: str, model, tokenizer, threshold: Optional[float] = None, prepare=None) -> str:
    """Write a FLES-1 checkpoint folder that all three loaders read (`FLES1Encoder.save_pretrained` and the
    project's `fles1.checkpoint.save_checkpoint` share this): the model's weights (safetensors), config and code
    files, `threshold` (when given) as the config's ``inference_threshold``, the tokenizer cutting where the
    config's document max length does, and the sentence-transformers files (written by sentence-transformers,
    which loads the folder; without it installed they are left out, with a warning). ``prepare(staging)``, when
    given, runs before those load it (the project puts its code and license files in).

    Everything is written into a staging folder inside `folder` first, then moved in file by file, its config.json
    taken out first and put back last, Ctrl-C and SIGTERM held for those milliseconds: a save interrupted before the
    moves leaves the earlier checkpoint whole, a crash or kill -9 during them no config.json (the loaders say so) --
    never one model's config beside another's weights. Weight files of an earlier save this one does not write are
    removed; other files in `folder` stay.
    """
    config = model.config
    os.makedirs(folder, exist_ok=True)
    _remove_dead_writers_stagings(folder)
    staging = tempfile.mkdtemp(prefix=f"{SAVE_STAGING_PREFIX}{_writer()}.{os.getpid()}.", suffix=".partial",
                               dir=folder)
    try:
        with _writing_on_this_rank(model):
            model.save_pretrained(staging, safe_serialization=True)
        config_path = os.path.join(staging, "config.json")
        if threshold is not None:  # this encoder's own threshold, the folder's default from now on
            _write_json(config_path, {**_read_json_or_none(config_path), "inference_threshold": threshold})
        # padded on the right, as FLES1Encoder pads: sentence-transformers pads as the tokenizer says, and on the
        # left BERT's positions shift with each batch's longest text (1.0 apart from FLES1Encoder)
        length, tokenizer.model_max_length = tokenizer.model_max_length, config.document_max_length
        side, tokenizer.padding_side = tokenizer.padding_side, "right"
        try:
            tokenizer.save_pretrained(staging)
        finally:
            tokenizer.model_max_length, tokenizer.padding_side = length, side
        if prepare is not None:
            prepare(staging)
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            warnings.warn(f"{folder}: no sentence-transformers files (modules.json & co.) written: "
                          "sentence-transformers is not installed", stacklevel=3)
        else:
            write_sentence_transformers_files(staging, config)
        drop_loader_flags(os.path.join(staging, "tokenizer_config.json"))
        _cut_tokenizer_file(os.path.join(staging, "tokenizer.json"), config.document_max_length)
        _plain_file_permissions(staging)
    except BaseException:
        _remove_staging(staging)
        raise
    with _signals_held():  # milliseconds: a Ctrl-C (SIGTERM) meanwhile lands once all is in place and cleaned
        try:
            _move_staged_into(staging, folder)
        finally:
            _remove_staging(staging)
    return folder


def _remove_staging(staging: str) -> None:
    """A save's staging folder and its copy in transformers' modules cache (`_drop_remote_code_copy`)."""
    shutil.rmtree(staging, ignore_errors=True)
    _drop_remote_code_copy(os.path.basename(staging))


@contextlib.contextmanager
def _signals_held():
    """A SIGINT or SIGTERM arriving while the block runs (main thread) is recorded and sent again after it: any
    thread of the process may receive it, so the handlers stand in rather than a thread's signal mask."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received, previous = [], {}
    for number in (signal.SIGINT, signal.SIGTERM):
        previous[number] = signal.signal(number, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in received:
            signal.raise_signal(number)  # to this (the main) thread: handled here, not whenever another runs


def _move_staged_into(staging: str, folder: str) -> None:
    """`save_checkpoint_folder`'s last step: staged files on disk, the folder's config.json out, stale weight files
    out, each staged file renamed into place, config.json last."""
    staged = [os.path.relpath(os.path.join(parent, name), staging)
              for parent, _, names in os.walk(staging) for name in names]
    staged.sort(key=lambda name: name == "config.json")  # the folder's config.json last: it makes the folder load
    for name in staged:
        _fsync(os.path.join(staging, name))
    stale = [name for name in os.listdir(folder) if name not in staged and WEIGHT_FILES.fullmatch(name)]
    for name in ["config.json"] + stale:  # (another variant's files, model.fp16.safetensors, stay)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
    _fsync(folder)
    for name in staged:
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        os.replace(os.path.join(staging, name), os.path.join(folder, name))
    _fsync(folder)


def _fsync(path: str) -> None:
    """A file's or folder's content on disk, where the system allows it (best effort: a power loss is the rare case)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _plain_file_permissions(folder: str) -> None:
    """The files transformers' save made 0600 (its weights) get the permissions a plainly created file has (the
    umask's), as the tokenizer and config files have: weights the other users of a shared machine could not read."""
    probe = os.path.join(folder, ".permissions")
    with open(probe, "w"):
        pass
    plain = os.stat(probe).st_mode & 0o777
    os.remove(probe)
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            if not os.path.islink(path) and os.stat(path).st_mode & 0o777 == 0o600:
                os.chmod(path, plain)


def _writer() -> str:
    """This process's host and pid namespace (containers sharing the host's name have namespaces of their own):
    where its pid names this process. (`fles1.atomic` names its temporaries the same way.)"""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux
        namespace = 0
    return f"{socket.gethostname()}_ns{namespace}"


def _remove_dead_writers_stagings(folder: str) -> None:
    """Staging folders a save of this host and pid namespace left when its process was killed outright, and their
    copies in transformers' modules cache."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return
    pattern = re.compile(re.escape(f"{SAVE_STAGING_PREFIX}{_writer()}.") + r"(\d+)\.[^/]*\.partial")
    for name in os.listdir(folder):
        match = pattern.fullmatch(name)
        if match and int(match.group(1)) != os.getpid():
            try:
                os.kill(int(match.group(1)), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
                _drop_remote_code_copy(name)
            except OSError:  # another user's live process
                pass


def _cut_tokenizer_file(path: str, length: int) -> None:
    """tokenizer.json's own truncation (what Rust tooling reading it applies; transformers sets its own per call)
    at the document max length, not where the last call before the save (training's, the source's) left it."""
    if not os.path.isfile(path):
        return
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(path)
    if backend.truncation is not None and backend.truncation["max_length"] != length:
        backend.enable_truncation(length, stride=backend.truncation["stride"],
                                  strategy=backend.truncation["strategy"], direction=backend.truncation["direction"])
        backend.save(path)


def _drop_remote_code_copy(folder_name: str) -> None:
    """Loading a folder's remote code (sentence-transformers does, writing its files), transformers copies it into its
    modules cache under the folder's name (transformers_modules/<name>/) and imports it; for a staging folder (a
    random name, never loaded again) that was one orphaned copy per save -- also where the save was interrupted."""
    from transformers.dynamic_module_utils import TRANSFORMERS_DYNAMIC_MODULE_NAME, _sanitize_module_name
    from transformers.utils import HF_MODULES_CACHE

    name = _sanitize_module_name(folder_name)
    shutil.rmtree(os.path.join(HF_MODULES_CACHE, TRANSFORMERS_DYNAMIC_MODULE_NAME, name), ignore_errors=True)
    package = f"{TRANSFORMERS_DYNAMIC_MODULE_NAME}.{name}"
    for module in [module for module in sys.modules if module == package or module.startswith(f"{package}.")]:
        del sys.modules[module]


def _warn_if_hub_sentence_transformers_files_differ(repo_id: str, download: dict, config: dict) -> None:
    """A folder's checks of its sentence-transformers files, for a hub checkpoint, on its snapshot folder (a hub load
    was silent where the same files in a folder warned); `config`: the settings to compare the lengths with."""
    from transformers.utils import cached_file

    # functools.partial, not a lambda: no frame of its own, so each warning's stacklevel still reaches the caller
    checks = [("config_sentence_transformers.json", _warn_if_sentence_transformers_prompts_or_prunes),
              ("sentence_bert_config.json",
               functools.partial(_warn_if_sentence_transformers_cuts_elsewhere, config=config)),
              ("modules.json", _warn_if_sentence_transformers_pools_otherwise)]
    for name, warn in checks:
        try:
            found = cached_file(repo_id, name, **download, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
            # modules.json names the poolings' own files: fetched into the same snapshot
            for pooling in _splade_pooling_configs(os.path.dirname(found)) if found and name == "modules.json" else ():
                cached_file(repo_id, pooling, **download, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
        except Exception:  # (an unreachable Hub, an unusual repo): the model loaded, the check is a courtesy
            continue
        if found:
            warn(os.path.dirname(found))


def _warn_if_sentence_transformers_cuts_elsewhere(path: str, config, stacklevel: int = 4) -> None:
    """sentence-transformers reads the lengths from sentence_bert_config.json (encode_query / encode_document) and
    the tokenizer's model_max_length (its ``max_seq_length``: ``encode`` without a task), FLES1Encoder and the model
    from config.json; a SparseEncoder saved after ``model[0].query_length = 32`` or ``model.max_seq_length = 32``
    changes only the former."""
    if not isinstance(config, dict):
        return
    settings = _read_json_or_none(os.path.join(path, "sentence_bert_config.json"))
    tokenizer_config = _read_json_or_none(os.path.join(path, "tokenizer_config.json"))
    if not isinstance(settings, dict):
        return  # not a sentence-transformers folder (a plain save_pretrained): nothing cuts elsewhere
    model_max_length = tokenizer_config.get("model_max_length") if isinstance(tokenizer_config, dict) else None
    if not isinstance(model_max_length, int) or isinstance(model_max_length, bool):
        model_max_length = None
    elif isinstance(config.get("max_position_embeddings"), int):
        # sentence-transformers' max_seq_length: the tokenizer's, capped by the positions (an unset one is 1e30)
        model_max_length = min(model_max_length, config["max_position_embeddings"])
    lengths = {"query_length": ("encode_query", "query_max_length"),
               "document_length": ("encode_document", "document_max_length")}
    differ = []
    for st_key, (method, key) in lengths.items():
        # a length the file does not hold: sentence-transformers cuts at max_seq_length (a folder saved by a
        # SparseEncoder built from a plain save_pretrained: queries at 256 instead of 64)
        cut, where = (settings[st_key], f"sentence_bert_config.json {st_key}") if settings.get(st_key) is not None \
            else (model_max_length, f"no {st_key} in sentence_bert_config.json: its max_seq_length")
        if cut is not None and key in config and cut != config[key]:
            differ.append(f"{method} at {cut} tokens ({where}), config.json {key} {config[key]}")
    if isinstance(tokenizer_config, dict) and tokenizer_config.get("padding_side") == "left":
        warnings.warn(f"{path}: sentence-transformers pads batches on the left (tokenizer_config.json padding_side), "
                      "so BERT's positions shift with each batch's longest text; FLES1Encoder pads on the right: "
                      "SparseEncoder and FLES1Encoder give different vectors in batches (`FLES1Encoder."
                      "from_pretrained(FOLDER).save_pretrained(OUT)` writes padding_side right)",
                      SparseEncoderMismatchWarning, stacklevel=stacklevel)
    if model_max_length is not None and "document_max_length" in config and \
            model_max_length != config["document_max_length"]:
        differ.append(f"encode (no task) at {model_max_length} tokens (tokenizer_config.json model_max_length: "
                      f"its max_seq_length), config.json document_max_length {config['document_max_length']}")
    if differ:
        warnings.warn(f"{path}: sentence-transformers cuts in {'; '.join(differ)} (config.json's is what "
                      "FLES1Encoder and the model use): SparseEncoder and FLES1Encoder give different vectors for "
                      "longer texts; `python convert_fles1.py FOLDER OUT --query-max-length N --document-max-length "
                      "M` writes all three files alike", SparseEncoderMismatchWarning, stacklevel=stacklevel)


def splade_pooling_problem(settings: dict) -> Optional[str]:
    """What a sentence-transformers SpladePooling config.json does otherwise than FLES-1; None when it pools alike."""
    strategy, activation = settings.get("pooling_strategy", "max"), settings.get("activation_function", "relu")
    if (strategy, activation) == ("max", "relu"):
        return None
    return (f"its SpladePooling pools with pooling_strategy={strategy!r}, activation_function={activation!r}: FLES-1 "
            "encodes with 'max' and 'relu' (log(1 + ReLU), max over tokens) only")


def _splade_pooling_configs(path: str) -> list[str]:
    """The config.json of each SpladePooling module modules.json lists, relative to the folder."""
    modules = _read_json_or_none(os.path.join(path, "modules.json"))
    return [f"{module['path']}/config.json" for module in (modules if isinstance(modules, list) else ())
            if isinstance(module, dict) and str(module.get("type", "")).endswith("SpladePooling")
            and isinstance(module.get("path"), str)]


def _warn_if_sentence_transformers_pools_otherwise(path: str) -> None:
    """A SparseEncoder saved with another pooling (sum, or another activation) pools so on every later load:
    FLES1Encoder and the model always max-pool log(1 + ReLU)."""
    for name in _splade_pooling_configs(path):
        settings = _read_json_or_none(os.path.join(path, name))
        problem = splade_pooling_problem(settings if isinstance(settings, dict) else {})
        if problem:
            warnings.warn(f"{path}: sentence-transformers' {name}: {problem}: SparseEncoder and FLES1Encoder give "
                          "different vectors", SparseEncoderMismatchWarning, stacklevel=4)


def _warn_if_sentence_transformers_prompts_or_prunes(path: str) -> None:
    """sentence-transformers applies the prompts, default prompt and ``max_active_dims`` saved in
    config_sentence_transformers.json (``SparseEncoder(..., prompts={"query": "query: "})`` or ``max_active_dims=64``,
    then ``save``) on every later load; FLES1Encoder and the model encode the texts as given, every term kept."""
    settings = _read_json_or_none(os.path.join(path, "config_sentence_transformers.json"))
    if not isinstance(settings, dict):
        return
    prompts = settings.get("prompts") if isinstance(settings.get("prompts"), dict) else {}
    default = settings.get("default_prompt_name")
    # sentence-transformers holds a "query" and a "document" prompt ("" unless saved) and uses them for
    # encode_query / encode_document, empty or not; the default prompt serves encode() without a task only
    differ = [f"{method} prepends {prompt!r}" for method, prompt in (
        ("encode_query", prompts.get("query")), ("encode_document", prompts.get("document")),
        ("encode (no task)", prompts.get(default) if isinstance(default, str) else None))
        if isinstance(prompt, str) and prompt]
    if settings.get("max_active_dims") is not None:
        differ.append(f"every vector keeps its top {settings['max_active_dims']} terms (max_active_dims)")
    if differ:
        warnings.warn(f"{path}: sentence-transformers' config_sentence_transformers.json says: {'; '.join(differ)}. "
                      "FLES1Encoder and the model encode the texts as given, every term kept: SparseEncoder and "
                      "FLES1Encoder give different vectors; "
                      "to match, save the SparseEncoder after `model.prompts = {'query': '', 'document': ''}; "
                      "model.default_prompt_name = None; model.max_active_dims = None`", SparseEncoderMismatchWarning,
                      stacklevel=4)


def safetensors_files(path: str) -> list[str]:
    """The folder's weight files: model.safetensors, or the shards its index lists (``save_pretrained(...,
    max_shard_size=...)``); a missing one, or a broken index, is a CheckpointError naming it."""
    weights_path = os.path.join(path, "model.safetensors")
    index_path = f"{weights_path}.index.json"
    if os.path.isfile(weights_path) or not os.path.isfile(index_path):
        if not os.path.isfile(weights_path):
            raise CheckpointError(f"{weights_path}: missing; FLES-1 loads weights from safetensors only")
        return [weights_path]
    try:
        with open(index_path, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{index_path}: not a safetensors index (JSON with a 'weight_map': {error!r})") from error
    for shard in shards:
        if not isinstance(shard, str) or not os.path.isfile(os.path.join(path, shard)):
            raise CheckpointError(f"{os.path.join(path, str(shard))}: missing (listed in {index_path})")
    return [os.path.join(path, shard) for shard in shards]


def lone_surrogate(text: str) -> Optional[int]:
    """Where `text` holds a lone surrogate, or None. A str can (e.g. json.loads of a broken "\ud83d" escape); no
    tokenizer takes one."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def _validate_text(text, name: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name} is {type(text).__name__}, expected str")
    position = lone_surrogate(text)
    if position is not None:
        raise ValueError(f"{name} holds a lone surrogate {text[position]!r} at character {position}, which no "
                         "tokenizer takes; text.encode('utf-8', 'replace').decode() turns it into '?'")


def _validate_texts(texts) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"expected a list of str, got a single {type(texts).__name__}; use encode() for one text")
    if isinstance(texts, Mapping) or hasattr(texts, "columns"):  # iterating would encode the keys / column names
        raise TypeError(f"expected a list of str, got a {type(texts).__name__}; pass its texts, e.g. "
                        "list(mapping.values()) or frame['text']")
    texts = list(texts)
    for index, text in enumerate(texts):
        _validate_text(text, f"texts[{index}]")
    return texts


# models switched to eval mode by encoders that are encoding: id -> `_EvalSwitch`
_EVAL_SWITCHES: dict = {}
_MODE_LOCK = threading.Lock()


class _EvalSwitch:
    """A model held in eval mode while encodes run: how many are in flight, each module's training flag from
    before, the modules whose ``train`` a `_TrainWhileEncoding` stands in for, and the ``train(mode)`` calls made
    meanwhile (replayed, in order, when the last encode returns)."""

    def __init__(self, model):
        modules = list(model.modules())
        self.in_flight = 0
        self.flags = [(module, module.training) for module in modules]
        self.calls = []
        # modules with a train of their own (an instance attribute) are left alone -- but for the class's own, bound,
        # that a copy taken during an earlier encode holds (`_TrainWhileEncoding.__reduce__`)
        self.stood_in = [module for module in modules if "train" not in vars(module) or _class_train(module)]
        model.eval()
        for module in self.stood_in:
            vars(module)["train"] = _TrainWhileEncoding(self, module)

    def release(self) -> None:
        """Back to the flags from before, then the calls made meanwhile, through each module's own train."""
        for module in self.stood_in:
            if isinstance(vars(module).get("train"), _TrainWhileEncoding):
                del vars(module)["train"]
        for module, training in self.flags:
            module.training = training
        for module, mode in self.calls:
            module.train(mode)


def _class_train(module) -> bool:
    """Whether `module`'s instance attribute ``train`` is its class's own train, bound to it."""
    own = vars(module).get("train")
    return getattr(own, "__self__", None) is module and getattr(own, "__func__", None) is type(module).train


class _TrainWhileEncoding:
    """``module.train(mode)`` (and ``module.eval()``) while encodes hold its model in eval mode: recorded, and made
    when the last of them returns -- instead of being undone then, as the flags from before are put back."""

    __slots__ = ("switch", "module")

    def __init__(self, switch: _EvalSwitch, module):
        self.switch, self.module = switch, module

    def __call__(self, mode: bool = True):
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")  # nn.Module.train's own check
        with _MODE_LOCK:
            if self.switch.in_flight > 0:
                self.switch.calls.append((self.module, mode))
                return self.module
        return type(self.module).train(self.module, mode)  # the encodes ended meanwhile

    def __reduce__(self):
        # a copy or pickle of the module taken meanwhile (deepcopy, torch.save) gets its class's train back, bound to
        # the copy: looked up while the copy is rebuilt, before its instance attributes are set
        return getattr, (self.module, "train")


def _not_finite(name: str) -> FloatingPointError:
    return FloatingPointError(f"{name}: the model's output is NaN or infinite -- its parameters hold NaN or inf (a "
                              "diverged run or a corrupt checkpoint?), or a half-precision model overflowed; nothing "
                              "encoded")


def passes_threshold(weights, threshold: float):
    """The inference rule, for numpy arrays and torch tensors alike: weights >= threshold, and > 0 at threshold 0.

    The threshold is compared as the float32 the weights are: a positive one that rounds to 0 there (below ~7e-46)
    would otherwise become ``weights >= 0`` and keep every zero."""
    cut = float32_cut(threshold)
    return weights >= cut if cut > 0 else weights > 0


def float32_cut(threshold: float) -> float:
    """The threshold as the float32 it is compared as (inf -> float32's max, which no finite weight reaches)."""
    return float(np.float32(min(threshold, FLOAT32_MAX)))


def _validate_threshold(threshold: float) -> float:
    # numbers.Real: Python and numpy ints and floats (np.float32 is not a float subclass); not bools
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real) or not threshold >= 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    try:
        return float(threshold)
    except OverflowError:  # an int past float range (10**400): above every weight, as inf is
        return math.inf


def _validate_batch_size(batch_size) -> int:
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return int(batch_size)


def _checked_max_length(config, name: str, default: int) -> int:
    """config.<name> (a config edited after loading is not checked by its class): an int in [3, positions]."""
    value = getattr(config, name, default)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 3:
        raise ValueError(f"config.{name} must be an int >= 3 (room for [CLS], one token, [SEP]), got {value!r}")
    if positions is not None and value > positions:  # longer inputs would index past the position embeddings
        raise ValueError(f"config.{name}={value} exceeds max_position_embeddings={positions}")
    return int(value)


def _dropout_active(model) -> bool:
    """Whether the model, or a mode-dependent module of it, is training (``model.eval(); model.bert.train()``
    leaves the root's flag False, and dropout on): the model's cached check, or the root's flag alone for a model
    whose code predates it."""
    if model.training:
        return True
    check = getattr(model, "dropout_active", None)
    return check() if check is not None else False


def _own_model_classes():
    """(FLES1Config, FLES1ForMaskedLM) from configuration_fles1.py and modeling_fles1.py beside this file; None where
    this file stands alone (fetched by itself from the Hub); a str saying why when those files are there but other
    copies are the ones imported (another FLES-1 folder on sys.path first)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if not all(os.path.isfile(os.path.join(here, name)) for name in ("configuration_fles1.py", "modeling_fles1.py")):
        return None
    try:
        import configuration_fles1
        import modeling_fles1
    except ImportError as error:
        return f"configuration_fles1 / modeling_fles1 beside {__file__} do not import ({error})"
    for module in (configuration_fles1, modeling_fles1):
        if os.path.dirname(os.path.abspath(module.__file__)) != here:
            return f"{module.__name__} is imported from {module.__file__}, not from beside {__file__}"
    return configuration_fles1.FLES1Config, modeling_fles1.FLES1ForMaskedLM


def _resolve_device(device) -> torch.device:
    """``device`` as a torch.device that can hold tensors here; None -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not usable here: {error}") from error
    if resolved.type == "meta":  # tensors without data: the model would load, and every encode fail
        raise ValueError(f"device={device!r} is not usable here: meta tensors hold no data")
    if resolved.type == "cuda" and resolved.index is not None and torch.cuda.is_available() \
            and resolved.index >= torch.cuda.device_count():  # CUDA's own error is four lines of debugging advice
        count = torch.cuda.device_count()
        raise ValueError(f"device={device!r} is not usable here: this machine has {count} CUDA device"
                         f"{'s' if count != 1 else ''} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    try:
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError, TypeError) as error:  # torch says "not compiled with CUDA" by assert
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"device={device!r} is not usable here: {first_line}") from error
    return resolved


# What modeling_fles1.projection_dtype_of accepts, checked here too (this file ships alone): a checkpoint whose
# modeling code predates that check took torch.int8 into wrong vectors and a name as a device string.
PROJECTION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                     "float64": torch.float64}


def _execution_device(module) -> Optional[torch.device]:
    """The device accelerate's hook on `module` runs it on (its weights offloaded to the meta device between calls),
    or None without such a hook."""
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # a SequentialHook, or one
        device = getattr(one, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def _model_dtype(key: str, value):
    """A `dtype=` for from_pretrained as the torch dtype transformers takes: a torch dtype, its name ("bfloat16",
    "torch.bfloat16": transformers took only "auto" as a string) or a numpy one (np.float16); floating point only."""
    if isinstance(value, Mapping):  # transformers' per-module dtypes ({"": torch.float16}): its own checks
        return value
    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    elif not isinstance(value, torch.dtype):
        try:
            dtype = torch.from_numpy(np.zeros(0, dtype=np.dtype(value))).dtype
        except (TypeError, ValueError):
            dtype = None
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise SettingError(f"{key}={value!r} is not a floating-point dtype; load in torch.float32 (the folder's), "
                           "torch.bfloat16 or torch.float16 (or 'auto')")
    return dtype


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (as config.json and the choices name it)."""
    return str(dtype).removeprefix("torch.")


def _projection_dtype_of(value) -> Optional[torch.dtype]:
    """None, a floating torch dtype, or its name ("bfloat16", "torch.bfloat16") -> the torch dtype or None."""
    if value is None or (isinstance(value, torch.dtype) and value in PROJECTION_DTYPES.values()):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in PROJECTION_DTYPES:
        return PROJECTION_DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"projection_dtype={value!r} is not supported; choose None (the model's dtype) or one of "
                     f"{list(PROJECTION_DTYPES)} (as torch dtypes or names)")


class FLES1Encoder:
    """Encode texts into sparse vocabulary-weight vectors with a FLES-1 model.

    Args:
        model: a loaded `FLES1ForMaskedLM` (or any model with `encode_sparse`).
        tokenizer: its tokenizer.
        threshold: weights below it are dropped (default: `config.inference_threshold`, 0.3, followed when the
            config is edited, as are its query/document max lengths).
        projection_dtype: dtype of the vocabulary projection (None: the model's; `torch.bfloat16` or "bfloat16",
            float16, float32, float64). On CPU a bf16/fp16 projection of a float32 model screens the vocabulary
            in that dtype and recomputes the candidates in float32 (the float32 vectors), where the CPU sums it in
            float32; elsewhere (accelerators, older checkpoint code) it rounds them. On CPUs with int8 VNNI the
            default is faster (see benchmarks/bench_encode.py). Checked when set: another value is a ValueError.
    """

    def __init__(self, model, tokenizer, threshold: Optional[float] = None, projection_dtype=None):
        self._synced_with = None
        self.model = model  # encoded in eval mode always; a model that is training is left training (`_eval_mode`)
        self.tokenizer = tokenizer
        self._threshold = None  # None: config.inference_threshold, followed as it changes (`_sync`)
        if threshold is not None:
            self.threshold = threshold
        self.projection_dtype = projection_dtype
        self._sync()

    @property
    def model(self):
        return self._model

    @model.setter
    def model(self, value) -> None:
        """A model assigned later (a server swapping in new weights) brings its own config: its threshold (unless
        this encoder was given one), max lengths, vocabulary, device and dtype."""
        self._model, self.config = value, value.config
        self._embeddings = value.get_input_embeddings()  # `device` at once
        self._synced_with = None  # `_sync` derives the rest again

    @property
    def projection_dtype(self) -> Optional[torch.dtype]:
        return self._projection_dtype

    @projection_dtype.setter
    def projection_dtype(self, value) -> None:
        self._projection_dtype = _projection_dtype_of(value)

    @property
    def threshold(self) -> float:
        """Weights below it are dropped: the one given (argument or assignment), else `config.inference_threshold`."""
        self._sync()
        return self._synced_threshold()

    def _synced_threshold(self) -> float:  # `threshold` without the sync, for callers that have just synced
        return self._threshold if self._threshold is not None else self._config_threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = _validate_threshold(value)

    @property
    def max_lengths(self) -> dict[str, int]:
        """Tokens (special ones included) a text is cut at, per kind: `config.document_max_length` and
        `config.query_max_length`, followed as they change."""
        self._sync()
        return dict(self._max_lengths)

    def _sync(self) -> None:
        """Derive what the encoder caches from the tokenizer and the model, again whenever tokens were added
        (``tokenizer.add_tokens``), the vocabulary resized (``model.resize_token_embeddings``), the tokenizer
        replaced or its truncation side changed, or the config's max lengths or threshold edited (what
        save_pretrained would write): ~1 us a call. A tokenizer with more tokens than the vocabulary has rows (tokens
        added, the model not resized yet) is refused for every text, not only those using the new ids."""
        config = self.config
        settings = vars(config)  # a config's attribute reads cost ~1 us each (PreTrainedConfig.__getattribute__)
        key = (id(self.tokenizer), len(self.tokenizer), self.tokenizer.truncation_side, settings.get("vocab_size"),
               settings.get("query_max_length"), settings.get("document_max_length"),
               settings.get("inference_threshold"))
        if key == self._synced_with:
            return
        self._max_lengths = {
            "document": _checked_max_length(config, "document_max_length", 256),
            "query": _checked_max_length(config, "query_max_length", 64),
        }
        if self._threshold is None:  # a threshold given (argument or assignment) is this encoder's for good
            try:
                self._config_threshold = _validate_threshold(getattr(config, "inference_threshold", 0.3))
            except ValueError:
                raise ValueError(f"config.inference_threshold must be a number >= 0, got "
                                 f"{config.inference_threshold!r}") from None
        if len(self.tokenizer) > self.config.vocab_size:  # ids past the rows: an IndexError inside BERT per text
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens for a vocabulary of "
                             f"{self.config.vocab_size} rows: ids past {self.config.vocab_size - 1} have no row "
                             "(model.resize_token_embeddings(len(tokenizer)), or the model's own tokenizer)")
        self._vocab = self.tokenizer.convert_ids_to_tokens(list(range(self.config.vocab_size)))
        # rows past the tokenizer (a vocabulary padded to a multiple of 64, say) have no word: a name of their own,
        # not None (a dict would merge them all under one key)
        self._vocab = [term if term is not None else f"[vocab_{index}]" for index, term in enumerate(self._vocab)]
        # a text whose ids are only these ([CLS] [SEP]) has nothing to encode: it is blank, like ""
        self._special_token_count = self.tokenizer.num_special_tokens_to_add(pair=False)
        self._embeddings = self.model.get_input_embeddings()
        self._rust_tokenizers = {}  # max length -> configured copy (`_rust_tokenizer`)
        self._synced_with = key

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        device: Optional[str | torch.device] = None,
        threshold: Optional[float] = None,
        projection_dtype=None,
        trust_remote_code: Optional[bool] = None,
        **hub_kwargs,
    ) -> "FLES1Encoder":
        """Load a FLES-1 checkpoint folder or Hub repo (e.g. ``"mindoval/fles1-v14"``).

        ``device`` defaults to CUDA when available. ``hub_kwargs``: download options (revision, token, cache_dir,
        local_files_only, ...), config settings (``query_max_length=128``, ``inference_threshold``, ...), the
        tokenizer's ``use_fast``, and model options (``dtype``, ``attn_implementation``), each sent where it belongs.
        ``trust_remote_code``: run the checkpoint's own modeling and tokenizer code (transformers' remote code).
        By default only when this file stands alone (fetched by itself with ``hf_hub_download``, as the model card
        shows: the repo's code is being run already); beside configuration_fles1.py and modeling_fles1.py (this
        project, a checkpoint folder on ``sys.path``) the model loads through those classes and no code of the
        checkpoint runs -- evaluating a stranger's checkpoint does not execute it.
        """
        if threshold is not None:
            _validate_threshold(threshold)
        device = _resolve_device(device)  # before the load: a wrong device should not cost a download
        for key in MODEL_DTYPE_OPTIONS:  # transformers refuses it once the config is read, as a ValueError
            if hub_kwargs.get(key) is not None and hub_kwargs[key] != "auto":
                hub_kwargs[key] = _model_dtype(key, hub_kwargs[key])
        if os.path.isdir(path_or_hub_id):
            _check_local_checkpoint(path_or_hub_id)
        elif is_local_path(path_or_hub_id):  # transformers would call it an invalid repo id
            raise CheckpointError(f"{path_or_hub_id}: {not_a_folder(path_or_hub_id)}")
        own = None if trust_remote_code else _own_model_classes()
        if isinstance(own, str):  # not silently the checkpoint's code instead
            raise CheckpointError(f"{path_or_hub_id}: {own}; pass trust_remote_code=True to run the checkpoint's own "
                                  "code instead")
        if own is None and trust_remote_code is False:
            raise CheckpointError(f"{path_or_hub_id}: trust_remote_code=False, and no configuration_fles1.py / "
                                  f"modeling_fles1.py beside {__file__} to load it with")
        if "output_loading_info" in hub_kwargs:  # the model would come back as a tuple
            raise TypeError("FLES1Encoder.from_pretrained does not take output_loading_info (use "
                            "FLES1ForMaskedLM.from_pretrained for the loading info)")
        download = {key: value for key, value in hub_kwargs.items() if key in DOWNLOAD_OPTIONS}
        tokenizer_options = {key: value for key, value in hub_kwargs.items() if key in TOKENIZER_OPTIONS}
        # the rest: config settings first (the config consumes them), what is left goes to the model; sent to every
        # loader, query_max_length reached the model's constructor and use_fast the model (TypeErrors)
        settings_and_model_options = {key: value for key, value in hub_kwargs.items()
                                      if key not in DOWNLOAD_OPTIONS + TOKENIZER_OPTIONS + MODEL_DTYPE_OPTIONS}
        dtype_options = {key: value for key, value in hub_kwargs.items() if key in MODEL_DTYPE_OPTIONS}
        try:
            if own is not None:
                settings, unused = own[0].get_config_dict(path_or_hub_id, **download)  # config.json, read once
                if settings.get("model_type") != own[0].model_type:
                    raise CheckpointError(
                        f"{path_or_hub_id}: config.json has model_type {settings.get('model_type')!r}, not a FLES-1 "
                        "model (expected 'fles1'; convert a BERT checkpoint with convert_fles1.py)")
                config, model_options = _config_with(
                    lambda **given: own[0].from_dict(settings, return_unused_kwargs=True, **{**unused, **given}),
                    settings_and_model_options, path_or_hub_id)
                model, loading = own[1].from_pretrained(path_or_hub_id, config=config, use_safetensors=True,
                                                        output_loading_info=True, ignore_mismatched_sizes=True,
                                                        **download, **model_options, **dtype_options)
            else:
                config, model_options = _config_with(
                    lambda **given: AutoConfig.from_pretrained(path_or_hub_id, trust_remote_code=True,
                                                               return_unused_kwargs=True, **download, **given),
                    settings_and_model_options, path_or_hub_id)
                model, loading = AutoModelForMaskedLM.from_pretrained(
                    path_or_hub_id, config=config, trust_remote_code=True, use_safetensors=True,
                    output_loading_info=True, ignore_mismatched_sizes=True, **download, **model_options,
                    **dtype_options)
            # transformers starts weights the file lacks at random (a log line), drops those its model has no place
            # for, and re-initialises those of other shapes: the vectors would be wrong (and differ from load to load)
            misfit = weights_misfit(loading)
            if misfit:
                raise _weights_do_not_fit(path_or_hub_id, settings_and_model_options, misfit)
        except (CheckpointError, SettingError):  # a CheckpointError is an OSError, a SettingError a ValueError:
            raise  # neither is wrapped below
        except TypeError as error:  # a keyword no part takes (a typo): the model's constructor refused it
            unknown = sorted(set(settings_and_model_options) & set(str(error).replace("'", " ").split()))
            if not unknown:
                raise
            raise TypeError(f"FLES1Encoder.from_pretrained got {', '.join(unknown)}: neither a download option "
                            f"({', '.join(DOWNLOAD_OPTIONS)}), the tokenizer's use_fast, a config setting nor a model "
                            "loading option") from None
        except (ValueError, OSError) as error:
            # one line: transformers' offline message runs over two
            raise CheckpointError(f"{path_or_hub_id}: could not load the FLES-1 model ({' '.join(str(error).split())})"
                                  ) from error
        if not hasattr(model, "encode_sparse"):
            raise CheckpointError(
                f"{path_or_hub_id}: config.json loads {type(model).__name__}, not a FLES-1 model "
                "(expected model_type 'fles1'; convert a BERT checkpoint with convert_fles1.py)"
            )
        try:
            # the config given: without it transformers loads config.json again (and warns about model_type fles1)
            tokenizer = AutoTokenizer.from_pretrained(path_or_hub_id, config=config, trust_remote_code=own is None,
                                                      **download, **tokenizer_options)
        except Exception as error:  # the Rust tokenizer raises a bare Exception on a corrupt tokenizer.json
            raise CheckpointError(f"{path_or_hub_id}: could not load the tokenizer (tokenizer.json, "
                                  f"tokenizer_config.json): {str(error).strip().splitlines()[0]}") from error
        # the lengths' check on the config.json settings used: a length the caller set is its choice, not compared
        # (query_max_length=16 for a folder whose sentence-transformers files cut at 16 warned that config.json's 64
        # differed; any other option given skipped every comparison)
        compared = {key: value for key, value in model.config.to_dict().items()
                    if key not in settings_and_model_options}
        if os.path.isdir(path_or_hub_id):
            _warn_if_sentence_transformers_cuts_elsewhere(path_or_hub_id, compared, stacklevel=3)
        else:  # a hub id: the checks a folder gets, on the files downloaded
            _warn_if_hub_sentence_transformers_files_differ(path_or_hub_id, download, compared)
        return cls(model.to(device), tokenizer, threshold=threshold, projection_dtype=projection_dtype)

    @property
    def device(self) -> torch.device:
        weight = self._embeddings.weight  # not next(parameters()): that walks the modules on every call
        if weight.is_meta:  # offloaded by accelerate (cpu_offload, disk_offload): inputs go where its hook runs it
            return _execution_device(self._embeddings) or weight.device
        return weight.device

    # ---- core -------------------------------------------------------------------------------------------------
    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not supported; choose one of {list(KINDS)}")

    def _tokenize(self, texts: list[str], kind: str) -> list[list[int]]:
        """Token ids per text, truncated at the kind's max length (special tokens included)."""
        rust = self._rust_tokenizer(kind)
        if rust is not None:
            return [encoding.ids for begin in range(0, len(texts), TOKENIZE_CHUNK_TEXTS)
                    for encoding in rust.encode_batch(texts[begin : begin + TOKENIZE_CHUNK_TEXTS])]
        return self.tokenizer(  # a slow (Python) tokenizer
            texts, truncation=True, max_length=self._max_lengths[kind], add_special_tokens=True,
            return_attention_mask=False, return_token_type_ids=False,
        )["input_ids"]

    def _rust_tokenizer(self, kind: str):
        """This encoder's own copy of the Rust tokenizer, truncating like ``self.tokenizer(..., truncation=True,
        max_length=<kind's max length>)``; None for a slow tokenizer. transformers' wrapper re-configures its one
        Rust tokenizer on every call, so threads encoding queries and documents through it at once could truncate
        each other's texts; a copy per max length is configured once and never changed."""
        self._sync()  # every tokenization passes here
        length = self._max_lengths[kind]
        rust = self._rust_tokenizers.get(length)
        if rust is None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is None:
                return None
            rust = copy.deepcopy(backend)
            rust.enable_truncation(length, direction=self.tokenizer.truncation_side)
            rust.no_padding()
            self._rust_tokenizers[length] = rust
        return rust

    @contextlib.contextmanager
    def _eval_mode(self):
        """Dropout off while encoding, also for a model that is training (an encoder evaluating between training
        steps); each module's mode is restored after the last of the calls encoding at once (threads) returns --
        a per-call restore would switch dropout back on under another thread still encoding. ``train()`` /
        ``eval()`` called on the model or a submodule meanwhile takes effect then (`_TrainWhileEncoding`); a
        ``training`` flag assigned directly meanwhile is put back."""
        model = self.model
        with _MODE_LOCK:
            switch = _EVAL_SWITCHES.get(id(model))
            if switch is None and _dropout_active(model):
                switch = _EVAL_SWITCHES[id(model)] = _EvalSwitch(model)
            if switch is not None:
                switch.in_flight += 1
        try:
            yield
        finally:
            if switch is not None:
                with _MODE_LOCK:
                    switch.in_flight -= 1
                    if switch.in_flight == 0:
                        del _EVAL_SWITCHES[id(model)]
                        switch.release()

    @torch.inference_mode()
    def _encode_ids_batch(self, token_ids: list[list[int]]) -> torch.Tensor:
        """(len(token_ids), vocab) float32 on the model's device, before threshold."""
        length = max(len(ids) for ids in token_ids)
        input_ids = torch.full((len(token_ids), length), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), length), dtype=torch.long)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        features = {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids)}
        if not bool(attention_mask.all()):  # without padding, attention can skip the mask
            features["attention_mask"] = attention_mask
        features = {name: tensor.to(self.device) for name, tensor in features.items()}
        with self._eval_mode():
            return self.model.encode_sparse(**features, projection_dtype=self.projection_dtype).sparse_embeddings

    def _batches(self, texts: list[str], kind: str, batch_size: int, show_progress_bar: Optional[bool]):
        """Yield (positions, vectors) for the texts that have tokens. A window of texts at a time is tokenized and
        sorted by token count, then batched, so that padding is minimal and memory stays bounded."""
        batch_size = _validate_batch_size(batch_size)
        positions = [index for index, text in enumerate(texts) if text.strip()]
        if show_progress_bar is None:
            show_progress_bar = len(positions) >= PROGRESS_BAR_MIN_TEXTS
        with tqdm(total=len(positions), disable=not show_progress_bar, desc=f"Encoding {PLURALS[kind]}", unit=kind) as bar:
            for begin in range(0, len(positions), SORT_WINDOW_TEXTS):
                window = positions[begin : begin + SORT_WINDOW_TEXTS]
                token_ids = self._tokenize([texts[index] for index in window], kind)
                words = [i for i, ids in enumerate(token_ids) if len(ids) > self._special_token_count]
                bar.update(len(window) - len(words))  # no tokens (e.g. only zero-width characters): empty vectors
                order = sorted(words, key=lambda i: -len(token_ids[i]))
                for start in range(0, len(order), batch_size):
                    chunk = order[start : start + batch_size]
                    yield [window[i] for i in chunk], self._encode_ids_batch([token_ids[i] for i in chunk])
                    bar.update(len(chunk))

    def _sparsify(self, vectors: torch.Tensor, threshold: float):
        """Per row: (ids sorted by descending weight, weights) of the entries >= threshold (and > 0)."""
        vectors = vectors.float()
        keep = passes_threshold(vectors, threshold)
        rows, cols = keep.nonzero(as_tuple=True)
        weights = vectors[rows, cols]
        rows, cols, weights = rows.cpu().numpy(), cols.cpu().numpy(), weights.cpu().numpy()
        order = np.lexsort((-weights, rows))
        rows, cols, weights = rows[order], cols[order], weights[order]
        bounds = np.searchsorted(rows, np.arange(vectors.shape[0] + 1))
        return [(cols[bounds[i] : bounds[i + 1]], weights[bounds[i] : bounds[i + 1]]) for i in range(vectors.shape[0])]

    def _checked(self, texts, kind: str, threshold) -> tuple[list[str], float]:
        """(the texts as a list, the threshold to apply), or the error naming what is wrong."""
        self._check_kind(kind)
        texts = _validate_texts(texts)
        return texts, self.threshold if threshold is None else _validate_threshold(threshold)

    def _encoded_batches(self, texts: list[str], kind: str, batch_size, show_progress_bar):
        """Yield (positions, vectors) per batch of the texts that have tokens; a non-finite vector is an error."""
        for positions, vectors in self._batches(texts, kind, batch_size, show_progress_bar):
            # a threshold would drop NaN silently, and an inf weight makes an index's scores inf or NaN
            not_finite = ~torch.isfinite(vectors).all(dim=1)
            if bool(not_finite.any()):
                raise _not_finite(f"texts[{positions[int(not_finite.nonzero()[0])]}]")
            yield positions, vectors

    def _encode_ids(self, texts, kind, batch_size, show_progress_bar, threshold):
        texts, threshold = self._checked(texts, kind, threshold)
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        results = [empty] * len(texts)
        for positions, vectors in self._encoded_batches(texts, kind, batch_size, show_progress_bar):
            for position, pair in zip(positions, self._sparsify(vectors, threshold)):
                results[position] = pair
        return results

    def _encode_matrix(self, texts, kind, batch_size, show_progress_bar, threshold, output: str):
        """The texts' CSR matrix, written from each batch's entries in CSR order (row, then id ascending: what
        ``nonzero`` gives): ~2x the result at peak, where per-text (ids, weights) pairs took ~5x."""
        texts, threshold = self._checked(texts, kind, threshold)
        batches, lengths = [], np.zeros(len(texts), dtype=np.int64)
        for positions, vectors in self._encoded_batches(texts, kind, batch_size, show_progress_bar):
            vectors = vectors.float()
            rows, cols = passes_threshold(vectors, threshold).nonzero(as_tuple=True)
            weights = vectors[rows, cols].cpu().numpy()
            counts = np.bincount(rows.cpu().numpy(), minlength=len(positions))
            positions = np.asarray(positions, dtype=np.int64)
            lengths[positions] = counts
            batches.append((positions, counts, cols.cpu().numpy().astype(np.int32), weights))
        indptr = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        indices, data = np.empty(indptr[-1], dtype=np.int32), np.empty(indptr[-1], dtype=np.float32)
        for positions, counts, cols, weights in batches:
            # each entry's slot: its row's start, plus its place within the row
            first = np.repeat(np.cumsum(counts) - counts, counts)
            slots = np.repeat(indptr[positions], counts) + np.arange(len(cols)) - first
            indices[slots], data[slots] = cols, weights
        del batches
        shape = (len(texts), self.config.vocab_size)
        if output == "torch":
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                return torch.sparse_csr_tensor(
                    torch.from_numpy(indptr), torch.from_numpy(indices.astype(np.int64)), torch.from_numpy(data),
                    size=shape, check_invariants=False,
                )
        from scipy.sparse import csr_matrix

        return csr_matrix((data, indices, indptr), shape=shape)

    def _token_ids_one(self, text: str, kind: str) -> list[int]:
        """One text's ids, as `_tokenize` gives them: half the time of the transformers wrapper for a query."""
        rust = self._rust_tokenizer(kind)
        return self._tokenize([text], kind)[0] if rust is None else rust.encode(text).ids

    def _encode_one(self, text, kind: str, threshold: Optional[float]) -> tuple[list[int], list[float]]:
        """One text -> (ids, weights), highest weight first: the single-query path, without batching work."""
        _validate_text(text, "text")
        self._check_kind(kind)
        threshold = None if threshold is None else _validate_threshold(threshold)
        if not text.strip():
            return [], []
        token_ids = self._token_ids_one(text, kind)  # syncs with the config: its threshold is current below
        if threshold is None:
            threshold = self._synced_threshold()
        if len(token_ids) <= self._special_token_count:  # e.g. only zero-width or control characters
            return [], []
        if hasattr(self.model, "encode_sparse_terms"):
            # via numpy: a quarter of torch.tensor's cost on a list of ints
            input_ids = torch.from_numpy(np.array([token_ids], dtype=np.int64)).to(self.device)
            with torch.inference_mode(), self._eval_mode():  # the active terms only: no dense (vocab,) vector
                ids, weights = self.model.encode_sparse_terms(input_ids, projection_dtype=self.projection_dtype)
        else:  # a checkpoint whose modeling_fles1.py predates encode_sparse_terms: its dense vector
            vector = self._encode_ids_batch([token_ids])[0]
            ids = vector.nonzero().squeeze(1)
            weights = vector[ids]
        # a few dozen terms: plain Python beats a chain of small tensor ops; ties keep vocabulary order. The cut is
        # compared in float32, as the batch path's tensors are.
        weights = weights.tolist()
        if not all(math.isfinite(weight) for weight in weights):  # NaN the threshold would drop silently, or inf
            raise _not_finite("text")
        cut = float32_cut(threshold)
        terms = [(i, w) for i, w in zip(ids.tolist(), weights) if (w >= cut if cut > 0 else w > 0)]
        terms.sort(key=lambda term: -term[1])
        return [i for i, _ in terms], [w for _, w in terms]

    # ---- public API -------------------------------------------------------------------------------------------
    def encode(self, text: str, kind: Kind = "document", threshold: Optional[float] = None) -> dict[str, float]:
        """One text -> {term: weight}, highest weight first, weights >= threshold."""
        ids, weights = self._encode_one(text, kind, threshold)
        return {self._vocab[i]: w for i, w in zip(ids, weights)}

    def encode_batch(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        kind: Kind = "document",
        threshold: Optional[float] = None,
        show_progress_bar: Optional[bool] = None,
        output: Literal["dict", "ids", "csr", "torch"] = "dict",
    ):
        """Encode many texts.

        output: ``"dict"`` (list of {term: weight}), ``"ids"`` (list of (ids, weights) numpy pairs),
        ``"csr"`` (scipy.sparse.csr_matrix, rows = texts) or ``"torch"`` (torch sparse CSR tensor).
        A progress bar shows for long inputs (or set ``show_progress_bar``).
        """
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r} is not supported; choose one of {list(OUTPUTS)}")
        if output in ("csr", "torch"):
            return self._encode_matrix(texts, kind, batch_size, show_progress_bar, threshold, output)
        pairs = self._encode_ids(texts, kind, batch_size, show_progress_bar, threshold)
        if output == "dict":
            return [{self._vocab[i]: float(w) for i, w in zip(ids, weights)} for ids, weights in pairs]
        return pairs

    def encode_to_ids(
        self, text: str, kind: Kind = "document", threshold: Optional[float] = None
    ) -> tuple[list[int], list[float]]:
        """One text -> (vocabulary ids, weights), highest weight first: the form inverted indices ingest."""
        return self._encode_one(text, kind, threshold)

    def encode_queries(self, queries: Sequence[str], **kwargs):
        return self.encode_batch(queries, kind="query", **kwargs)

    def encode_documents(self, documents: Sequence[str], **kwargs):
        return self.encode_batch(documents, kind="document", **kwargs)

    def encode_to_csr(self, texts: Sequence[str], kind: Kind = "document", batch_size: int = 32, **kwargs):
        """texts -> scipy.sparse.csr_matrix of shape (len(texts), vocab_size), float32."""
        return self.encode_batch(texts, batch_size=batch_size, kind=kind, output="csr", **kwargs)

    def vocabulary(self) -> list[str]:
        """The term of every vocabulary id (what `decode` gives): the tokenizer's tokens, and ``[vocab_<id>]`` for
        rows past them (a vocabulary padded to a multiple of 64)."""
        self._sync()
        return list(self._vocab)

    def decode(self, ids: Iterable[int], weights: Optional[Iterable[float]] = None):
        """Vocabulary ids -> terms; with weights, -> {term: weight}. An id outside the vocabulary (negative ones
        included), a weights list of another length, or (with weights) an id given twice is a ValueError naming
        it: a dict keeps one weight per term, and which of two is not for decode to guess."""
        self._sync()
        terms = []
        for position, token_id in enumerate(ids):
            try:
                if isinstance(token_id, (bool, np.bool_)):  # operator.index(True) is 1: '[unused0]'
                    raise TypeError
                index = operator.index(token_id)  # ints and numpy/torch integers; not floats
            except TypeError:
                raise TypeError(f"ids[{position}] is {type(token_id).__name__}, expected an int") from None
            if not 0 <= index < len(self._vocab):
                raise ValueError(f"ids[{position}]={index} is not a vocabulary id (0..{len(self._vocab) - 1})")
            terms.append(self._vocab[index])
        if weights is None:
            return terms
        weights = [float(w) for w in weights]
        if len(weights) != len(terms):
            raise ValueError(f"ids and weights differ in length ({len(terms)} vs {len(weights)})")
        decoded = dict(zip(terms, weights))
        if len(decoded) < len(terms):
            first = {}
            for position, term in enumerate(terms):
                if first.setdefault(term, position) != position:
                    raise ValueError(f"ids[{position}] repeats ids[{first[term]}] ({term!r}): one weight per term")
        return decoded

    def save_pretrained(self, save_directory: str) -> str:
        """Save a FLES-1 checkpoint folder that loads back as this encoder -- through `from_pretrained`,
        AutoModel / AutoModelForMaskedLM (``trust_remote_code=True``) and sentence-transformers' SparseEncoder alike:
        the model's weights (safetensors), config (``auto_map``; this encoder's threshold as
        ``inference_threshold`` when one was given) and code files with this file and the license files it came
        with, the tokenizer, and the sentence-transformers files (written by sentence-transformers, cutting where
        the config does; where it is not installed they are left out, with a warning). Returns the folder. Over an
        earlier checkpoint, the save is written beside its files and moved in with config.json last
        (`save_checkpoint_folder`): interrupted, the folder holds one model or the other -- a kill -9 or crash during
        the moves leaves no config.json (the loaders refuse it) -- never a mix.

        Example:

        ```python
        >>> encoder = FLES1Encoder.from_pretrained(dir, threshold=0.5)
        >>> folder = encoder.save_pretrained("fles1-t05")
        >>> FLES1Encoder.from_pretrained(folder).threshold
        0.5

        ```
        """
        self._sync()
        save_checkpoint_folder(save_directory, self.model, self.tokenizer, threshold=self._threshold)
        return save_directory

    def __repr__(self) -> str:
        return (
            f"FLES1Encoder(model={self.config.name_or_path!r}, device={self.device}, "
            f"dtype={dtype_name(self._embeddings.weight.dtype)}, threshold={self.threshold}, "
            f"max_lengths={self.max_lengths}"
            + (f", projection_dtype={dtype_name(self.projection_dtype)}" if self.projection_dtype else "") + ")"
        )


__all__ = ["FLES1Encoder", "CheckpointError", "SparseEncoderMismatchWarning", "dtype_name", "passes_threshold",
           "is_local_path", "not_a_folder", "lone_surrogate"]
