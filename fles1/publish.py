"""Publish a FLES-1 checkpoint folder to the Hugging Face Hub with its model card, results and plots.

Steps: find the token (before any work) -> assemble the Hub folder -> validate it in a fresh, offline subprocess
(AutoModel with trust_remote_code, SparseEncoder with trust_remote_code, FLES1Encoder.from_pretrained imported from
the folder itself, as a user does after ``hf_hub_download``; a probe text's query and document vectors must agree,
the probe long enough to be cut at both max lengths) -> refuse to upload
when any check fails -> ``create_repo`` + ``upload_folder``.

    >>> from fles1.publish import CardInputs, publish
    >>> # outputs/fles1-tiny and its evaluation outputs/t0.json: convert_fles1.py's and eval_fles1.py's docstrings
    >>> publish("outputs/fles1-tiny", "mindoval/fles1-v14", CardInputs(results=["outputs/t0.json"]),
    ...         dry_run="outputs/hub_out")
"""

from __future__ import annotations

import filecmp
import fnmatch
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import yaml

from fles1.atomic import atomic_directory, path_within, require_new_folder, scratch_directory
from fles1.card import (CardInputError, build_card, check_license_id, check_repo_id, check_revision, publishable,
                        read_eval, read_json)
from fles1.checkpoint import (HUB_CODE_FILES, TOKENIZER_CODE_REFUSED, copy_code_files, license_of,
                              load_source_tokenizer, tokenizer_code)
from fles1_encoder import TOKENIZER_FILES, drop_loader_flags
from modeling_fles1 import LICENSE_FILES

REQUIRED_FILES = ("config.json", "modules.json", "tokenizer_config.json", *HUB_CODE_FILES)  # + the weights
# What a push publishes of the model folder: an allowlist (a training folder also holds logs, notes, wandb/, links
# to files elsewhere: all were uploaded), plus the license files and the sentence-transformers module folders that
# modules.json names. Weights are safetensors only (a stale pytorch_model.bin would differ from them).
CHECKPOINT_FILES = ("config.json", "config_sentence_transformers.json", "modules.json", "sentence_bert_config.json",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.txt", "*.safetensors", "*.safetensors.index.json", *HUB_CODE_FILES)
# Left out without a word: what training writes beside the model (its log and plots are published as results/ and
# plots/), the card the push replaces, dotfiles (.git, .env, an interrupted assembly's .*.partial); anything else
# left out is named.
TRAINING_LEFTOVERS = ("checkpoint-*", "trainer_state.json", "runs", "__pycache__", "*.png", "training_log.json",
                      "README.md", "results", "plots", "nnz_trace_rank*.json", "training_args.bin", ".*")
# What a push replaces as a whole on the branch it commits to: an earlier push's weights at the repo's root (sharded
# ones after a single model.safetensors would leave that file, which the loaders prefer: users would get the old
# model), results/ and plots/ (they would outlive the card that described them). Other files stay (fp16/..., notes).
REPLACED_FOLDERS = ("results/", "plots/")
REPLACED_ROOT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def replaced_on_push(repo_files: Sequence[str]) -> list[str]:
    """The files of the branch a push replaces (`REPLACED_FOLDERS`, `REPLACED_ROOT_SUFFIXES`), as fnmatch patterns
    matching only themselves (upload_folder's delete_patterns: a bare ``*.safetensors`` matches subfolders too)."""
    return [glob.escape(name) for name in repo_files if name.startswith(REPLACED_FOLDERS)
            or ("/" not in name and name.endswith(REPLACED_ROOT_SUFFIXES))]


PROBE_TEXT = "What is machine learning? Sparse retrieval with FLES-1 and BM25 baselines."
TOLERANCE = 1e-5
VALIDATION_TIMEOUT_S = 600
NO_TOKEN_MESSAGE = ("no Hugging Face token found: set the HF_TOKEN environment variable or run `hf auth login` "
                    "(or pass --dry-run OUT_DIR to build the folder without uploading)")


class PublishError(RuntimeError):
    """Publishing refused; the message says why (a failed check is named)."""


class UploadError(PublishError):
    """The inputs were fine, the Hub refused them or could not be reached: no commit was made."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        return f"[{'ok' if self.ok else 'FAILED'}] {self.name}" + (f": {self.detail}" if self.detail else "")


# ---- token ------------------------------------------------------------------------------------------------------
def resolve_token() -> str:
    """HF_TOKEN, else the token of a prior ``hf auth login``. Never printed."""
    from huggingface_hub import get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise PublishError(NO_TOKEN_MESSAGE)
    return token


# ---- assembling -------------------------------------------------------------------------------------------------
def published_entries(model_dir: str) -> tuple[list[str], list[str]]:
    """(the model folder's entries a push publishes, the others that are not training leftovers: named, left out)."""
    try:
        with open(os.path.join(model_dir, "modules.json"), encoding="utf-8") as handle:
            modules = {str(module.get("path") or "") for module in json.load(handle) if isinstance(module, dict)}
    except (OSError, ValueError, TypeError, AttributeError):  # the checks name a missing or broken modules.json
        modules = set()
    published, left_out = [], []
    for name in sorted(os.listdir(model_dir)):
        if any(fnmatch.fnmatch(name, pattern) for pattern in CHECKPOINT_FILES) or LICENSE_FILES.match(name) \
                or (name in modules and os.path.isdir(os.path.join(model_dir, name))):
            published.append(name)
        elif not any(fnmatch.fnmatch(name, pattern) for pattern in TRAINING_LEFTOVERS):
            left_out.append(name)
    return published, left_out


def _copy_published(model_dir: str, out_dir: str, log) -> None:
    published, left_out = published_entries(model_dir)
    if left_out:
        log(f"left out of the upload (not part of a FLES-1 checkpoint): {', '.join(left_out)}")
    for name in published:
        source, target = os.path.join(model_dir, name), os.path.join(out_dir, name)
        if not os.path.exists(source):  # a link to nothing
            raise PublishError(f"{source}: a link to a file that does not exist ({os.readlink(source)})")
        try:
            if os.path.isdir(source):  # a module folder: its configs
                shutil.copytree(source, target, ignore=shutil.ignore_patterns(".*", "__pycache__"))
            else:
                _copy_public(source, target)
        except (shutil.Error, OSError) as error:
            raise PublishError(f"{source}: cannot be copied ({error})") from None


def _copy_public(source: str, target: str) -> None:
    """Copy a file; a JSON or YAML one as `public_text` writes it (no local path, no secret)."""
    text = public_text(source)
    if text is None:
        shutil.copyfile(source, target)
    else:
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(text)


def _copy_unique(paths: Sequence[str], folder: str, rename=None) -> list[str]:
    """Copy files into folder keeping their names (index-prefixed on a clash); returns paths relative to the root.
    JSON and YAML copies name no absolute local path and hold no secret (`public_text`)."""
    os.makedirs(folder, exist_ok=True)
    copied = []
    for index, path in enumerate(paths):
        if not os.path.isfile(path):
            raise PublishError(f"{path}: file not found")
        name = base = rename(index, path) if rename else os.path.basename(path)
        prefix = index
        while os.path.exists(os.path.join(folder, name)):  # a prefixed name may be taken too ("2_eval.json")
            name, prefix = f"{prefix}_{base}", prefix + len(paths)
        try:
            _copy_public(path, os.path.join(folder, name))
        except OSError as error:  # an unreadable plot: a traceback, exit 1 (push's code for a Hub failure)
            raise PublishError(f"{path}: cannot be copied ({error.strerror or error})") from None
        copied.append(os.path.join(folder, name))
    return copied


def public_text(path: str) -> Optional[str]:
    """A results JSON, training log or recipe YAML as published (`fles1.card.publishable`): each absolute local path
    in its values (an eval's ``model.path``, a recipe's ``model.path`` / ``data.source`` / ``output_dir``, a note
    naming a file) cut to its last component, as the card shows them, and secrets (a recipe's ``hub_token``, URL
    credentials) redacted; None when there is none (or the file is neither): the file is copied as it is."""
    if not path.endswith((".json", ".yaml", ".yml")):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if path.endswith(".json"):
            values = json.loads(text)
            public = publishable(values)
            return None if public == values else json.dumps(public, indent=2, ensure_ascii=False) + "\n"
        return _public_yaml(text)
    except (OSError, ValueError, yaml.YAMLError):  # the card's reader reports what is wrong with it
        return None


def _public_yaml(text: str) -> Optional[str]:
    """`public_text` of a YAML file: each string scalar holding a local path rewritten where it stands, as a quoted
    string (a bare ``2026-11-27`` or ``42`` would read back as a date or a number), comments and layout kept."""
    spans = []

    def visit(node, key=""):
        if isinstance(node, yaml.MappingNode):
            for name, item in node.value:
                visit(item, str(getattr(name, "value", "")))
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                visit(item, key)
        elif isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            public = publishable(node.value, key)
            if public != node.value:
                spans.append((node.start_mark.index, node.end_mark.index, json.dumps(public, ensure_ascii=False)))

    root = yaml.compose(text)
    if root is not None:
        visit(root)
    for start, end, replacement in sorted(spans, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text if spans else None


def _training_log_name(index: int, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            seed = json.load(handle).get("seed")
    except (OSError, ValueError, AttributeError):  # not a JSON object: the card's reader names the file
        seed = None
    # an int only: a hand-edited "1/2" named a file in a folder that does not exist
    integer = isinstance(seed, int) and not isinstance(seed, bool)
    return f"training_log_seed{seed}.json" if integer else "training_log.json"


@dataclass(frozen=True)
class CardInputs:
    """What the model card and the folder's results/ and plots/ are built from.

    results: eval_fles1.py JSON files (at least one to publish); training_logs: training_log.json files (default:
    the model folder's own); plots: PNG files (default: the model folder's); recipe: recipe YAML (default: the
    training log's); base_model: Hub id of the backbone; studies: Markdown study tables (experiments/summarize.py);
    license: Hub license id (default: from the model folder's license files, `fles1.checkpoint.license_of`).
    """

    results: Sequence[str] = ()
    training_logs: Sequence[str] = ()
    plots: Sequence[str] = ()
    recipe: Optional[str] = None
    base_model: Optional[str] = None
    studies: Optional[str] = None
    license: Optional[str] = None


def assemble(model_dir: str, out_dir: str, repo_id: str, card: CardInputs = CardInputs(), check=None,
             revision: Optional[str] = None, log=print) -> str:
    """Write the Hub folder: checkpoint files + the project's code files + results/ + plots/ + README.md (the card).

    A training output folder's own ``training_log.json`` and ``*.png`` are used when none are given. The folder is
    built beside ``out_dir`` and renamed into place at the end, after ``check(staging_folder)`` (if given) returns:
    a missing input, a failed check or an interruption leaves nothing at ``out_dir``. ``revision``: the branch the
    folder is pushed to, which the card's snippets then load.
    """
    if not os.path.isdir(model_dir):
        raise PublishError(f"{model_dir}: model folder not found")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):  # e.g. a data folder: assembled, then 5 checks
        raise PublishError(f"{model_dir}: no config.json, not a FLES-1 checkpoint folder (convert_fles1.py and "
                           "train_fles1.py write them)")
    if path_within(out_dir, model_dir):  # it would be copied into itself, and into every later folder
        raise PublishError(f"{out_dir}: inside the model folder {model_dir}, which the Hub folder copies; choose an "
                           "output folder outside it")
    try:
        code = tokenizer_code(model_dir)
    except ValueError as error:
        raise PublishError(f"{model_dir}: {error}") from None
    if code:  # the validation would run it, and users' loaders after them
        raise PublishError(f"{model_dir}: its tokenizer is code of its own ({code}), {TOKENIZER_CODE_REFUSED}")
    shipped, license_file = license_of(model_dir)  # the backbone's, copied by convert; uploaded with the weights
    if card.license is not None:
        try:
            check_license_id(card.license)
        except CardInputError as error:
            raise PublishError(f"--{error}") from None
        if shipped != "unknown" and (card.license == "apache-2.0") != (shipped == "apache-2.0"):
            what = "the Apache-2.0 text" if shipped == "apache-2.0" else "another license's text"
            raise PublishError(f"--license {card.license}, but {os.path.join(model_dir, license_file)} (the "
                               f"backbone's, shipped with the weights) is {what}: the card's license must be the "
                               "file's")
        if card.license == "other" and shipped == "unknown":  # the card would link a file the repo lacks
            raise PublishError(f"--license other names the repository's license file, and {model_dir} has none: "
                               "copy the backbone's license file into it, or give its Hub license id")
    if card.results:
        _check_results_are_of(model_dir, card.results)
    try:
        require_new_folder(out_dir, hint="; choose a new output folder")
    except OSError as error:
        raise PublishError(str(error)) from None
    try:
        with atomic_directory(out_dir) as staging:
            try:
                _assemble_into(model_dir, staging, repo_id, card, (shipped, license_file), revision, log)
            except CardInputError as error:  # a results/log/recipe file that is not what the card reads: one line
                raise PublishError(str(error)) from None
            if check is not None:
                check(staging)
    except FileExistsError as error:  # another push wrote the folder meanwhile: a traceback, exit 1 (a Hub failure)
        raise PublishError(f"{error}; choose a new output folder") from None
    except OSError as error:  # e.g. a parent folder not writable (the staging folder is made there)
        raise PublishError(f"{out_dir}: not assembled ({error})") from None
    return out_dir


def _check_results_are_of(model_dir: str, results: Sequence[str]) -> None:
    """The first results file is the published model's (the card's metrics); its model fingerprint must be the
    folder's, or the card would show another model's numbers. Every file of the folder's model (the headline table
    merges them) must have been evaluated with the folder's tokenizer."""
    from fles1.evaluation import model_fingerprint
    from fles1_encoder import CheckpointError

    config_path = os.path.join(model_dir, "config.json")
    try:
        every = [(path, read_eval(path)) for path in results]  # the card's checks of the format first
        config = read_json(config_path, "model config") if os.path.isfile(config_path) else {}
    except CardInputError as error:
        raise PublishError(str(error)) from None
    results, evaluated = every[0]
    recorded = evaluated["model"].get("fingerprint") if isinstance(evaluated.get("model"), dict) else None
    # eval_fles1.py always records it: a hand-edited or foreign file, whose numbers nothing ties to the folder
    if not recorded or not isinstance(recorded, str):
        raise PublishError(f"{results}: records no model fingerprint (model.fingerprint), so nothing shows its "
                           f"numbers are {model_dir}'s; evaluate it (eval_fles1.py --model {model_dir}) and pass that "
                           "file")
    try:
        actual = model_fingerprint(model_dir)
    except CheckpointError:  # no (complete) weights: the checks say so, naming the file
        actual = None
    if actual and recorded != actual:
        raise PublishError(f"{results}: evaluated the model with fingerprint {recorded}, not {model_dir} "
                           f"({actual}); evaluate it (eval_fles1.py --model {model_dir}) and pass that file "
                           "first -- further --results files (other seeds) may be other models")
    folder_tokenizer = _tokenizer_fingerprint_of(model_dir) if actual else None
    for path, data in every:  # older files record no tokenizer
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        recorded_tokenizer = model.get("tokenizer_fingerprint")
        if folder_tokenizer and model.get("fingerprint") == actual and recorded_tokenizer \
                and recorded_tokenizer != folder_tokenizer:
            raise PublishError(f"{path}: evaluated with a tokenizer (fingerprint {recorded_tokenizer}) other than "
                               f"{model_dir}'s ({folder_tokenizer}); its numbers are not this folder's: evaluate it "
                               f"(eval_fles1.py --model {model_dir})")
    # The card states the results' threshold as the model's inference threshold: it must be the one users get.
    shipped = config.get("inference_threshold")
    threshold = evaluated.get("threshold")
    numbers = isinstance(shipped, (int, float)) and isinstance(threshold, (int, float))
    if numbers and float(threshold) != float(shipped):
        raise PublishError(f"{results}: evaluated at threshold {threshold}, but the model's inference threshold "
                           f"(config.json) is {shipped}, which users get: evaluate at it (eval_fles1.py without "
                           f"--threshold) or convert the model with --threshold {threshold}")


def _assemble_into(model_dir: str, out_dir: str, repo_id: str, card: CardInputs, shipped_license: tuple,
                   revision: Optional[str] = None, log=print) -> None:
    """`assemble`'s work inside the staging folder; ``shipped_license``: `license_of(model_dir)`."""
    if not card.training_logs and os.path.isfile(os.path.join(model_dir, "training_log.json")):
        card = replace(card, training_logs=[os.path.join(model_dir, "training_log.json")])
    if not card.plots:
        card = replace(card, plots=sorted(os.path.join(model_dir, n) for n in os.listdir(model_dir) if n.endswith(".png")))
    _copy_published(model_dir, out_dir, log)
    drop_loader_flags(os.path.join(out_dir, "tokenizer_config.json"))  # a folder saved before checkpoint.py did it
    copy_code_files(out_dir)  # the project's current code, not the copy saved with the weights (maybe older)
    results_dir, plots_dir = os.path.join(out_dir, "results"), os.path.join(out_dir, "plots")
    copied_results = _copy_unique(card.results, results_dir)
    _copy_unique(card.training_logs, results_dir, rename=_training_log_name)
    if card.recipe:
        _copy_unique([card.recipe], results_dir)
    copied_plots = _copy_unique(card.plots, plots_dir)
    if copied_results:
        shipped, license_file = shipped_license
        relative = lambda path: os.path.relpath(path, out_dir).replace(os.sep, "/")  # noqa: E731
        # built from the original files: training logs pair with runs by their model folders
        model_card = build_card(
            card.results, card.training_logs, card.recipe, repo_id, card.base_model,
            [relative(p) for p in copied_plots],
            result_names={src: relative(dst) for src, dst in zip(card.results, copied_results)}, studies=card.studies,
            revision=revision, license=card.license or shipped, license_file=license_file or "LICENSE",
        )
        model_card.save(os.path.join(out_dir, "README.md"))
        if card.studies:
            _copy_linked_images(card.studies, out_dir)


STUDY_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")  # ![alt](path)


def _copy_linked_images(studies: str, out_dir: str) -> None:
    """The images the studies text links (paths relative to that file) go where the card's links find them: the
    card embeds the text at the folder's root."""
    with open(studies, encoding="utf-8") as handle:
        links = dict.fromkeys(STUDY_IMAGE.findall(handle.read()))
    root = os.path.abspath(out_dir)
    for link in links:
        if "://" in link or os.path.isabs(link):
            continue  # served from elsewhere
        link = urllib.parse.unquote(link)  # "my%20fig.png" names "my fig.png" (the card writes its links so)
        source = os.path.join(os.path.dirname(os.path.abspath(studies)), link)
        target = os.path.normpath(os.path.join(root, link))
        if not path_within(target, root):
            raise PublishError(f"{studies}: links {link}, outside the published folder")
        if not os.path.isfile(source):
            raise PublishError(f"{studies}: links {link}, which is not at {source}")
        # a file the folder already holds (the model's own plots/loss.png, config.json) is never replaced by
        # another: the card would show the wrong image
        if os.path.exists(target) and not filecmp.cmp(source, target, shallow=False):
            raise PublishError(f"{studies}: links {link}, but the published folder has another file there (the "
                               "model's own); rename the study's image")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)


# ---- validating -------------------------------------------------------------------------------------------------
# Runs with the Hub folder as working directory and without the project on sys.path, so `import fles1_encoder`
# imports the copy shipped in the folder, exactly as a user does after hf_hub_download.
_VALIDATION_SCRIPT = r"""
import json, os, sys, traceback
folder, probe = sys.argv[1], sys.argv[2]
try:  # die with the publishing process: killed outright (kill -9), it would leave this one loading the model
    import ctypes, signal
    if ctypes.CDLL(None).prctl(1, signal.SIGKILL) == 0 and os.getppid() != int(sys.argv[5]):  # 1: PR_SET_PDEATHSIG
        os._exit(1)  # it died before the signal was set
except (AttributeError, OSError):  # no prctl: not Linux
    pass
# long enough to be cut at both max lengths: a folder whose sentence-transformers files cut queries or documents
# elsewhere than config.json says must not pass on a probe too short to reach either cut
probe = " ".join([probe] * 64)
checks, vectors, causes = [], {}, []

def check(name, load):
    try:
        for kind, vector in load().items():
            vectors[name, kind] = vector.detach().float().cpu().reshape(-1)
        detail = ", ".join(f"{kind} {int((vectors[name, kind] > 0).sum())} non-zeros" for kind in ("query", "document"))
        checks.append({"name": name, "ok": True, "detail": detail})
    except Exception as error:
        checks.append({"name": name, "ok": False, "detail": f"{type(error).__name__}: {error}"[-1500:]})

import torch

def auto_model():
    from transformers import AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    vectors = {}
    for kind in ("query", "document"):
        max_length = getattr(model.config, f"{kind}_max_length")
        features = tokenizer([probe], return_tensors="pt", truncation=True, max_length=max_length)
        with torch.inference_mode():
            vectors[kind] = model.encode_sparse(**features).sparse_embeddings[0]
    return vectors

def sparse_encoder():
    from sentence_transformers import SparseEncoder
    model = SparseEncoder(folder, trust_remote_code=True, device="cpu")
    return {"query": model.encode_query([probe], convert_to_tensor=True)[0].to_dense(),
            "document": model.encode_document([probe], convert_to_tensor=True)[0].to_dense()}

def fles1_encoder():
    from fles1_encoder import FLES1Encoder
    import fles1_encoder, os
    if os.path.dirname(os.path.abspath(fles1_encoder.__file__)) != os.path.abspath(folder):
        raise ImportError(f"imported {fles1_encoder.__file__}, not the folder's fles1_encoder.py")
    # the card's snippet fetches fles1_encoder.py alone and loads the repo's code: that path; its warnings about
    # sentence-transformers files that encode otherwise say why vectors differ (the others are shown as they were)
    import warnings
    mismatch = getattr(fles1_encoder, "SparseEncoderMismatchWarning", None)  # None: an older fles1_encoder.py
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder = FLES1Encoder.from_pretrained(folder, device="cpu", trust_remote_code=True)
    for warning in caught:
        if mismatch is not None and issubclass(warning.category, mismatch):
            causes.append(str(warning.message))
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return {kind: encoder.encode_batch([probe], kind=kind, threshold=0, output="torch").to_dense()[0]
            for kind in ("query", "document")}

loaders = ["AutoModel.from_pretrained(trust_remote_code=True)", "SparseEncoder(trust_remote_code=True)",
           "FLES1Encoder.from_pretrained"]
for name, load in zip(loaders, (auto_model, sparse_encoder, fles1_encoder)):
    check(name, load)
if len(vectors) == 6:
    details, ok = [], True
    for kind in ("query", "document"):
        reference = vectors["FLES1Encoder.from_pretrained", kind]
        diff = max(float((vectors[name, kind] - reference).abs().max()) for name in loaders)
        ok &= diff <= float(sys.argv[3]) and int((reference > 0).sum()) > 0
        details.append(f"{kind}: max abs difference {diff:.2e}, {int((reference > 0).sum())} non-zeros")
    checks.append({"name": "vectors agree", "ok": ok,
                   "detail": "; ".join(details) + f" (tolerance {sys.argv[3]}; a probe cut at both max lengths)"
                             + ("".join(f" -- {cause}" for cause in causes) if not ok else "")})
else:
    checks.append({"name": "vectors agree", "ok": False, "detail": "not every loader produced a vector"})
with open(sys.argv[4], "w") as handle:
    json.dump(checks, handle)
# transformers copied the folder's code into its modules cache under the staging folder's name, never used again
import shutil
from transformers.utils import HF_MODULES_CACHE
for package in {name.split(".")[1] for name in sys.modules if name.startswith("transformers_modules.")}:
    if "partial" in package:
        shutil.rmtree(os.path.join(HF_MODULES_CACHE, "transformers_modules", package), ignore_errors=True)
"""


def _tokenizer_fingerprint_of(model_dir: str) -> Optional[str]:
    """`fles1.evaluation.tokenizer_fingerprint` of the folder's tokenizer; None where it has no tokenizer files
    (transformers would build a stand-in: `check_files` names what is missing) or none loads."""
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in TOKENIZER_FILES):
        return None
    from configuration_fles1 import FLES1Config
    from fles1.evaluation import tokenizer_fingerprint

    try:
        return tokenizer_fingerprint(load_source_tokenizer(model_dir, FLES1Config.from_pretrained(model_dir)))
    except (OSError, ValueError):  # no usable tokenizer: the checks say so, naming the file
        return None


def check_files(folder: str) -> Check:
    from fles1_encoder import CheckpointError, safetensors_files

    missing = [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, name))]
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))  # else every loader builds a stand-in: all words [UNK]
    try:
        safetensors_files(folder)  # model.safetensors, or the shards its index lists
    except CheckpointError as error:
        missing.append(f"weights ({error})")
    return Check("required files", not missing, f"missing {', '.join(missing)}" if missing else "")


def check_card(folder: str) -> Check:
    from huggingface_hub import ModelCard

    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return Check("model card", False, "README.md missing (pass --results with an eval JSON)")
    try:
        card = ModelCard.load(path)
    except Exception as error:  # the Hub's parser raises several kinds
        return Check("model card", False, f"README.md metadata does not parse ({error})")
    results = card.data.eval_results or []
    return Check("model card", bool(results), f"{len(results)} model-index results" if results
                 else "README.md has no model-index results")


def validate(folder: str, probe: str = PROBE_TEXT, timeout: int = VALIDATION_TIMEOUT_S) -> list[Check]:
    """Every check on the assembled folder; the three loaders run in a fresh offline process."""
    checks = [check_files(folder), check_card(folder)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN")}
    # no __pycache__ written into the folder by importing its fles1_encoder.py: it would be uploaded
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1")
    folder = os.path.abspath(folder)
    with scratch_directory("fles1-validate") as scratch:
        report = os.path.join(scratch, "checks.json")
        try:
            process = subprocess.run(
                [sys.executable, "-c", _VALIDATION_SCRIPT, folder, probe, str(TOLERANCE), report, str(os.getpid())],
                cwd=folder, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return checks + [Check("fresh-process loading", False, f"timed out after {timeout} s")]
        if not os.path.isfile(report):
            return checks + [Check("fresh-process loading", False,
                                   f"exit code {process.returncode}: {process.stderr.strip()[-1500:]}")]
        with open(report, encoding="utf-8") as handle:
            return checks + [Check(**c) for c in json.load(handle)]


# ---- publishing -------------------------------------------------------------------------------------------------
def publish(
    model_dir: str,
    repo_id: str,
    card: CardInputs,
    private: bool = False,
    revision: Optional[str] = None,
    create_pr: bool = False,
    dry_run: Optional[str] = None,
    log=print,
):
    """Assemble, validate and (unless ``dry_run``) upload. Returns the dry-run folder or the CommitInfo."""
    if create_pr and revision not in (None, "main"):
        raise PublishError("--create-pr opens a pull request against the default branch; drop --revision "
                           f"({revision!r}) or drop --create-pr to commit to that branch")
    if not card.results:
        raise PublishError("the model card needs at least one eval results JSON: pass --results (eval_fles1.py --output)")
    if dry_run is not None and not str(dry_run).strip():  # "" is no folder: it was written to a temporary, then lost
        raise PublishError("--dry-run needs the folder to write (e.g. --dry-run hub_out)")
    try:  # a dry run too: its card and folder name the repo
        check_repo_id(repo_id, label="--repo-id")
    except CardInputError as error:
        raise PublishError(str(error)) from None
    try:  # before any work: the Hub refused it only at upload
        check_revision(revision)
    except CardInputError as error:
        raise PublishError(f"--{error}") from None
    token = None
    if dry_run is None:
        token = resolve_token()  # before any work
        from huggingface_hub import constants

        if constants.is_offline_mode():
            raise PublishError("HF_HUB_OFFLINE is set: uploading needs the network (unset it, or use --dry-run)")
    def validated(staging: str) -> None:
        log(f"assembled {staging}; validating in a fresh offline process ...")
        checks = validate(staging)
        for check in checks:
            log(str(check))
        failed = [check for check in checks if not check.ok]
        if failed:
            kept, reasons = "", "; ".join(str(c) for c in failed)
            if dry_run:  # kept for inspection under a name that does not pass for the finished folder
                rejected = f"{os.path.abspath(dry_run)}.rejected"
                try:
                    if os.path.isdir(rejected) and not os.path.islink(rejected):
                        shutil.rmtree(rejected)
                    elif os.path.lexists(rejected):
                        os.remove(rejected)
                    os.rename(staging, rejected)
                    kept = f" (the folder is left at {rejected} for inspection)"
                    # the checks named the staging folder, renamed since
                    reasons = reasons.replace(os.path.abspath(staging), rejected).replace(staging, rejected)
                except OSError as error:  # the checks' verdict is what to report
                    kept = f" (the folder could not be kept at {rejected}: {error.strerror})"
            raise PublishError(f"refusing to upload, failed checks: {reasons}{kept}")

    if not card.training_logs and not card.recipe and not os.path.isfile(os.path.join(model_dir, "training_log.json")):
        # a converted or an already published folder holds no training_log.json of its own
        earlier = sorted(glob.glob(os.path.join(model_dir, "results", "training_log*.json")))
        hint = "" if not earlier else f" ({earlier[0]} is an earlier publish's: pass it)" if len(earlier) == 1 else \
            f" ({', '.join(earlier)} are an earlier publish's: pass them)"
        log(f"warning: no training log or recipe: the card's Training section will be empty (--training-log "
            f"FILE{hint}, or --recipe)")
    with scratch_directory("fles1-hub") as scratch:
        folder = dry_run or os.path.join(scratch, "hub")
        # the folder appears only once it passed; a pull request is merged into main, which the snippets then load
        assemble(model_dir, folder, repo_id, card, check=validated, revision=None if create_pr else revision,
                 log=log)
        if dry_run is not None:
            log(f"dry run: {folder} is the folder that would be uploaded to {repo_id}; nothing uploaded")
            return folder
        repo_url, commit = _upload(folder, repo_id, token, private, revision, create_pr, f"Upload FLES-1 model, card "
                                   f"and results ({os.path.basename(os.path.abspath(model_dir))})")
        log(f"uploaded to {repo_url}: {commit.pr_url or commit.commit_url}")
        return commit


def _upload(folder: str, repo_id: str, token: str, private: bool, revision, create_pr: bool, message: str):
    """create_repo (+ create_branch) + upload_folder -> (repo url, CommitInfo); a refused or unreachable Hub is a
    PublishError naming the step (the token never appears in it)."""
    from huggingface_hub import HfApi, errors

    # HfHubHTTPError: the Hub said no (bad token, no rights); HTTPError (the HTTP client's base, which it extends)
    # and OSError: the network
    refused = (errors.HfHubHTTPError, getattr(errors, "HTTPError", OSError), OSError)
    api, step = HfApi(token=token), "create_repo"
    try:
        repo_url = api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)
        if private:  # create_repo leaves an existing repo's visibility as it is
            step = "repo_info"
            if api.repo_info(repo_id, repo_type="model").private is False:
                raise PublishError(f"--private: {repo_id} exists and is public, and create_repo does not change "
                                   "that; nothing was uploaded -- make the repo private on the Hub first, or drop "
                                   "--private to publish it publicly")
        if revision and not create_pr:
            step = "create_branch"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "list_repo_files"  # a pull request starts from the default branch
        replaced = replaced_on_push(api.list_repo_files(repo_id, repo_type="model",
                                                        revision=None if create_pr else revision))
        step = "upload_folder"  # the deletions ride the upload's commit (files uploaded again are not deleted)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                   create_pr=create_pr, commit_message=message, delete_patterns=replaced or None)
    except refused as error:
        reason = " ".join(str(error).split()).replace(token, "<token>")
        raise UploadError(f"upload to {repo_id} failed at {step} ({type(error).__name__}: {reason}); no commit was "
                           "made -- rerun once fixed (--dry-run OUT builds the folder without the Hub)") from None
    return repo_url, commit


__all__ = ["publish", "assemble", "CardInputs", "validate", "resolve_token", "PublishError", "UploadError", "Check",
           "PROBE_TEXT"]
