"""The FLES-1 checkpoint folder: one folder that is a transformers remote-code model, a sentence-transformers
SparseEncoder and an FLES1Encoder checkpoint at once."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from typing import Optional

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedConfig
from transformers.utils import cached_file

from configuration_fles1 import FLES1Config
from fles1 import PROJECT_ROOT
from fles1.atomic import atomic_directory, path_within, require_new_folder
from fles1_encoder import (dtype_name, is_local_path, missing_weights, not_a_folder, save_checkpoint_folder,
                           splade_pooling_problem, weights_misfit)
from modeling_fles1 import ENCODER_FILE, FLES1ForMaskedLM, license_files

HUB_CODE_FILES = ("configuration_fles1.py", "modeling_fles1.py", ENCODER_FILE)
DEFAULT_BACKBONE = os.path.join(os.path.dirname(PROJECT_ROOT), "shared", "models", "splade-tiny")


def copy_code_files(out_dir: str) -> None:
    """This project's Hub code files (HUB_CODE_FILES) into a checkpoint or Hub folder, over any older copies."""
    for name in HUB_CODE_FILES:
        shutil.copyfile(os.path.join(PROJECT_ROOT, name), os.path.join(out_dir, name))


def fles1_config_from(backbone_config, **sparse_settings) -> FLES1Config:
    """FLES-1 config carrying the backbone's BERT hyper-parameters plus the sparse-encoding settings."""
    values = backbone_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype"):
        values.pop(key, None)
    values.update({k: v for k, v in sparse_settings.items() if v is not None})
    config = FLES1Config(**values)
    config.architectures = ["FLES1ForMaskedLM"]
    return config



def save_checkpoint(model: FLES1ForMaskedLM, tokenizer, out_dir: str, license_from: Optional[str] = None) -> str:
    """`fles1_encoder.save_checkpoint_folder` (weights, config with auto_map, tokenizer, sentence-transformers
    files; staged and moved in, config.json last), with this project's code files over the ones the model came with
    and the license files (LICENSE, NOTICE, ...) of the folder the weights came from (`license_from`, default the
    model's own ``name_or_path``): a derived checkpoint is a redistribution of them (Apache-2.0 section 4)."""
    model.config.architectures = ["FLES1ForMaskedLM"]

    def prepare(staging: str) -> None:  # before sentence-transformers loads the folder: it runs this code
        copy_license_files(license_from or getattr(model, "name_or_path", None), staging)
        copy_code_files(staging)  # save_pretrained copied the checkpoint's own (maybe older) files: ship this code

    return save_checkpoint_folder(out_dir, model, tokenizer, prepare=prepare)


def copy_license_files(source: Optional[str], out_dir: str) -> list[str]:
    """The license files of `source` into out_dir: a local folder's, or a hub repo's (downloaded alone, from the
    cache when offline; nothing when it cannot be reached)."""
    if source and not os.path.isdir(source) and not is_local_path(source):
        source = _hub_license_folder(source)
    if not source or not os.path.isdir(source) or os.path.realpath(source) == os.path.realpath(out_dir):
        return []
    names = license_files(source)
    for name in names:
        shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
    return names


APACHE_2 = re.compile(r"Apache License,?\s+Version 2\.0", re.IGNORECASE)  # the text, or its short notice


def license_of(folder: str) -> tuple[str, Optional[str]]:
    """(Hub license id, the license file's name) of a checkpoint folder, from the license files convert copied from
    its backbone: "apache-2.0" when one is the Apache-2.0 text or notice, "other" for other texts, ("unknown",
    None) without any. The card said Apache-2.0 whatever the weights shipped with."""
    names = license_files(folder)
    licenses = [name for name in names if not name.upper().startswith("NOTICE")] or names
    for name in licenses:
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as handle:
            if APACHE_2.search(handle.read()):
                return "apache-2.0", name
    return ("other", licenses[0]) if licenses else ("unknown", None)


def _hub_license_folder(repo_id: str) -> Optional[str]:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["LICEN[CS]E*", "licen[cs]e*", "NOTICE*", "COPYING*"])
    except Exception as error:  # offline without a cached copy, no such repo, no network: say so, go on
        warnings.warn(f"{repo_id}: its license files could not be fetched ({type(error).__name__}); a checkpoint "
                      "derived from it should carry them: copy them into the folder")
        return None


def is_fles1_source(source: str) -> bool:
    """Whether a folder or hub id holds a FLES-1 checkpoint, read from its config.json without running its code."""
    return source_settings(source).get("model_type") == FLES1Config.model_type


def source_settings(source: str) -> dict:
    """config.json of a folder or hub id, unread code and all. A hub id that does not load (a mistyped folder
    name, offline) is one line saying so: transformers' message ran over two and never said no folder was there."""
    try:
        return PreTrainedConfig.get_config_dict(source)[0]
    except OSError as error:
        if os.path.isdir(source):
            raise
        raise OSError(f"no local folder of that name, and could not load it from the Hugging Face Hub "
                      f"({' '.join(str(error).split())})") from error


SUPPORTED_MODEL_TYPES = ("bert", FLES1Config.model_type)


def require_new_folder_for(source: str, out_dir: str, overwrite: bool) -> None:
    """`require_new_folder` for convert's output; where it is refused as not empty and it is the source or holds
    it, that is the error: "exists and is not empty (--overwrite replaces it)" pointed to a flag then refused."""
    try:
        require_new_folder(out_dir, overwrite, hint=OVERWRITE_HINT)
    except FileExistsError:
        refuse_output_holding_source(source, out_dir)
        raise


def refuse_output_holding_source(source: str, out_dir: str) -> None:
    """A ValueError where the output folder is a local source or holds it."""
    if os.path.isdir(source) and path_within(source, out_dir):
        raise ValueError(f"the output folder {out_dir} is the source or holds it: --overwrite would delete the "
                         "source; write the conversion elsewhere")


def check_source(source: str, out_dir: Optional[str] = None) -> str:
    """What convert refuses before loading any weights, as a ValueError saying what is supported; the source's
    model_type. A folder must hold safetensors weights, and a sentence-transformers SPLADE folder must pool as
    FLES-1 does (max over tokens of log(1 + ReLU)): another pooling would convert into a different model."""
    local = os.path.isdir(source)
    if out_dir is not None:
        refuse_output_holding_source(source, out_dir)
    if local and os.path.isfile(os.path.join(source, "config.json")):
        try:
            raw = _read_json(os.path.join(source, "config.json"))
        except ValueError:  # not JSON: transformers' own error names the file
            raw = {}
        if not isinstance(raw, dict):  # transformers read it as {} (5.9: a TypeError)
            raise ValueError("its config.json is not a JSON object of settings")
    settings = source_settings(source)
    if not settings:  # transformers reads a folder without config.json as {}
        routed = any(str(module.get("type", "")).endswith("Router") for module in _modules(source))
        raise ValueError("no config.json at its root: FLES-1 converts BERT masked-LM checkpoints and FLES-1 folders"
                         + (" (this is a sentence-transformers Router model, with a model per input kind: convert "
                            "the folder of its document-side Transformer module, if it is a BERT masked-LM)"
                            if routed else ""))
    model_type = settings.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported: FLES-1 converts BERT masked-LM checkpoints "
                         "(model_type 'bert': bert-base-uncased, SPLADE models on BERT) and FLES-1 folders")
    if local:
        names = os.listdir(source)
        if not any(name.endswith(".safetensors") or name == "model.safetensors.index.json" for name in names):
            found = sorted(name for name in names if name.endswith((".bin", ".pt", ".pth", ".ckpt")))
            raise ValueError(f"no safetensors weights{f' (found {found[0]})' if found else ''}: weights are loaded "
                             "from safetensors only; re-save the model with model.save_pretrained(folder), which "
                             "writes model.safetensors")
    for module in _modules(source):
        if module.get("type", "").endswith("SpladePooling"):
            pooling = cached_file(source, f"{module['path']}/config.json", _raise_exceptions_for_missing_entries=False,
                                  _raise_exceptions_for_connection_errors=False)
            problem = splade_pooling_problem(_read_json(pooling) if pooling else {})
            if problem:
                raise ValueError(f"{problem}, so the converted model would give other vectors")
    return model_type


def _modules(source: str) -> list:
    """The entries of a sentence-transformers folder's modules.json; [] for other folders."""
    modules = cached_file(source, "modules.json", _raise_exceptions_for_missing_entries=False,
                          _raise_exceptions_for_connection_errors=False)
    return _read_json(modules) if modules else []


def _read_json(path: str):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def tokenizer_code(source: str) -> Optional[str]:
    """Where a checkpoint's tokenizer is code of its own: ``"<file>: auto_map AutoTokenizer <classes>"`` for an
    ``auto_map`` naming an AutoTokenizer class in tokenizer_config.json or config.json; None for a plain tokenizer."""
    for name in ("tokenizer_config.json", "config.json"):
        path = cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        try:
            settings = _read_json(path) if path else {}
        except ValueError as error:
            raise ValueError(f"its {name} is not valid JSON ({error})") from None
        auto_map = settings.get("auto_map") if isinstance(settings, dict) else None
        if isinstance(auto_map, dict):
            code = auto_map.get("AutoTokenizer")
        else:  # tokenizer_config.json's auto_map was once the AutoTokenizer pair itself
            code = auto_map if name == "tokenizer_config.json" else None
        if code:
            return f"{name}: auto_map AutoTokenizer {code!r}"
    return None


TOKENIZER_CODE_REFUSED = ("which FLES-1 never runs: it tokenizes with BERT's WordPiece (tokenizer.json or "
                          "vocab.txt)")


def load_source_tokenizer(source: str, config):
    """The tokenizer of a checkpoint being converted, trained from or published, without running code from it: one
    that is code of its own (`tokenizer_code`) is refused. ``config``: the source's, loaded already (else
    transformers loads it again, and for a FLES-1 folder warns about its model type)."""
    code = tokenizer_code(source)
    if code:
        raise ValueError(f"its tokenizer is code of its own ({code}), {TOKENIZER_CODE_REFUSED}")
    return AutoTokenizer.from_pretrained(source, config=config, trust_remote_code=False)


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    """The tokenizer must name the model's vocabulary rows: one with more tokens than rows makes ids the model
    cannot look up (IndexError while encoding); one with far fewer is a stand-in (no tokenizer files in the source,
    every word [UNK]). A few unnamed rows at the end (a vocabulary padded to a multiple of 64) only warn."""
    tokens = len(tokenizer)
    if tokens > vocab_size:
        raise ValueError(f"its tokenizer has {tokens} tokens for a vocabulary of {vocab_size} rows: ids past "
                         f"{vocab_size - 1} have no row (resize_token_embeddings(len(tokenizer)) and save again)")
    if tokens < 0.9 * vocab_size:
        raise ValueError(f"its tokenizer has only {tokens} tokens for a vocabulary of {vocab_size} rows: no tokenizer "
                         "files in the source? (tokenizer.json or vocab.txt of the backbone's WordPiece vocabulary)")
    if tokens < vocab_size:
        warnings.warn(f"its tokenizer has {tokens} tokens for a vocabulary of {vocab_size} rows: the last "
                      f"{vocab_size - tokens} rows name no word; the converted tokenizer names them [vocab_<id>] "
                      "(special tokens, so that every loader decodes them alike; a text holding such a name verbatim "
                      "gets that row)")
        tokenizer.add_tokens([f"[vocab_{index}]" for index in range(tokens, vocab_size)], special_tokens=True)


OVERWRITE_HINT = " (--overwrite / overwrite=True replaces it)"


def convert(source: str, out_dir: str, *, overwrite: bool = False, **sparse_settings) -> str:
    """Any BERT masked-LM checkpoint (folder or hub id) -> FLES-1 checkpoint folder. ``out_dir`` must be new or
    empty unless ``overwrite``; it appears complete or not at all (built beside it, then renamed into place).
    The weights are written in float32 whatever the source's dtype (with a warning when that casts them): the
    exact int8-screened CPU path and the loaders' 1e-5 agreement are float32's; load in bf16 with ``dtype=``."""
    require_new_folder_for(source, out_dir, overwrite)  # before the load
    if not os.path.isdir(source) and is_local_path(source):
        raise FileNotFoundError(not_a_folder(source))  # a path, not a hub id: transformers would say "bad repo id"
    # A FLES-1 source (to change its settings) loads through this project's class: through the Auto classes its
    # config's auto_map would make it remote code, and transformers would stop to ask whether to run it.
    is_fles1 = check_source(source, out_dir) == FLES1Config.model_type
    try:
        source_model, loading = (FLES1ForMaskedLM if is_fles1 else AutoModelForMaskedLM).from_pretrained(
            source, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True)
    except StrictDataclassError as error:  # a config.json setting of the wrong type ("hidden_size": "abc")
        raise ValueError(f"config.json: {' '.join(str(error).split())}") from None
    missing = missing_weights(loading["missing_keys"])
    if missing:  # transformers initialised them at random: a BertModel's missing MLM head would be a random projection
        raise ValueError(f"not a BERT masked-LM checkpoint: its weights lack {', '.join(missing)} "
                         "(a model without the masked-LM head? FLES-1 needs the head's vocabulary projection)")
    misfit = weights_misfit(loading)  # tensors dropped (fewer layers) or of other shapes: other vectors
    if misfit:
        raise ValueError(f"config.json does not describe its weights: they {misfit}")
    config = fles1_config_from(source_model.config, **sparse_settings)
    model = FLES1ForMaskedLM(config)
    missing, unexpected = model.load_state_dict(source_model.state_dict(), strict=False)
    missing = missing_weights(missing)
    if missing or unexpected:
        raise ValueError(f"not a BERT masked-LM checkpoint (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    if source_model.dtype != torch.float32:  # a bf16 source doubles in size, a float64 one is rounded: said
        wider = source_model.dtype.itemsize < 4
        warnings.warn(f"{source}: weights are {dtype_name(source_model.dtype)}; the FLES-1 folder "
                      "holds them in float32 (" + ("twice the size; load with dtype=torch.bfloat16 to run in bf16)"
                                                   if wider else "half the size, rounded to float32)"), stacklevel=2)
    tokenizer = load_source_tokenizer(source, source_model.config)
    check_tokenizer(tokenizer, config.vocab_size)
    with atomic_directory(out_dir, replace=overwrite) as staging:
        save_checkpoint(model.to(torch.float32), tokenizer, staging, license_from=source)
    return out_dir
