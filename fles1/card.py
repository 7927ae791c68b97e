"""The FLES-1 model card, generated from result files only.

Inputs are the shared formats: eval JSON(s) written by ``eval_fles1.py --output``, ``training_log.json`` written by
``train_fles1.py`` and the recipe YAML. Every number in the card is read from one of them; a number no file holds is
rendered as ``—``. The YAML front matter (including ``model-index``) is built with huggingface_hub's ``ModelCardData``
and ``EvalResult``, so it parses with the Hub's own card tools.

Several eval JSONs are grouped by the model they evaluated (``model.fingerprint``, else ``model.path``): files of the
same model merge (e.g. one file per dataset); the first file's model is the published one, the others are further
runs (e.g. other seeds) and feed the reproducibility table (per-run rows, mean ± sample std).

    >>> from fles1.card import build_card       # the results: an eval of outputs/run (eval_fles1.py --output)
    >>> card = build_card(["outputs/eval_nfcorpus.json"], ["outputs/run/training_log.json"],
    ...                   repo_id="mindoval/fles1-v14")
    >>> card.save("outputs/run/README.md")      # not ./README.md: from the repo root that is the project's own
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from fles1 import PROJECT_ROOT

TEMPLATE_PATH = os.path.join(PROJECT_ROOT, "model_card", "template.md")
MISSING = "—"
LICENSE = "apache-2.0"  # the shipped backbone's (splade-tiny); a model folder's own LICENSE file decides on push
LICENSE_TEXTS = {
    "apache-2.0": "Apache-2.0, the license of the backbone checkpoint this model was built from; the code files in "
                  "this repository are under the same license.",
    "other": "The backbone checkpoint's own license (not Apache-2.0), in this repository's [{file}]({file}) file: "
             "the weights derive from that checkpoint.",
    "unknown": "Unknown: the backbone checkpoint this model was built from shipped no license file; check its terms "
               "before using or redistributing this model.",
}
DATASETS_LICENSE = " Evaluation datasets keep their own licenses."
TAGS = ["sparse-retrieval", "splade", "learned-sparse", "sentence-transformers", "sparse-encoder", "fles1",
        "feature-extraction", "text-retrieval"]

IR_METRICS = {"ndcg@10": "NDCG@10", "mrr@10": "MRR@10", "recall@100": "Recall@100", "map@100": "MAP@100",
              "recall@1000": "Recall@1000"}
SPARSITY_METRICS = {"nnz_doc": "NNZ doc", "nnz_query": "NNZ query"}
METRICS = {**IR_METRICS, **SPARSITY_METRICS}
PRODUCTION = {"docs_per_second": "Docs/s", "query_latency_ms_p50": "Query p50 (ms)",
              "query_latency_ms_p95": "Query p95 (ms)", "index_bytes_per_1k_docs": "Index MB / 1k docs",
              "index_ratio_to_dense_768": "Index size vs dense-768"}
CRASH_KINDS = ("non_finite_loss", "non_finite_grad", "loss_spike", "nnz_collapse", "total")
CLFR_KEY = re.compile(r"clfr|target_nnz|gain|lambda|interval", re.IGNORECASE)
# Looked up in the flattened recipe (nested keys joined by dots), first hub id wins.
BASE_MODEL_KEYS = ("base_model", "model.base_model", "model_name_or_path", "model.name_or_path", "model.path",
                   "backbone", "model")
TRAIN_DATA_KEYS = ("data.source", "data.dataset", "dataset", "train_dataset", "train_data", "data")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # legacy ids like bert-base-uncased have no owner
BEIR_NAMES = {"arguana", "climate-fever", "cqadupstack", "dbpedia-entity", "fever", "fiqa", "hotpotqa", "msmarco",
              "nfcorpus", "nq", "quora", "scidocs", "scifact", "trec-covid", "webis-touche2020", "touche2020"}


class CardInputError(ValueError):
    """A result file is missing or malformed; the message names the file."""


# ---- reading ----------------------------------------------------------------------------------------------------
def read_json(path: str, kind: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError as error:
        raise CardInputError(f"{path}: {kind} file not found") from error
    except OSError as error:  # permissions, a folder of that name: a traceback, exit 1
        raise CardInputError(f"{path}: cannot read the {kind} file ({error.strerror or error})") from None
    except ValueError as error:
        raise CardInputError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise CardInputError(f"{path}: expected a JSON object ({kind})")
    return data


def _check_types(path: str, data: dict, expected: dict, prefix: str = "") -> None:
    """Each `expected` key of `data` absent, null or of its types; a nested dict of types checks an object's keys
    (a hand-edited file: `"model": "x"` was an AttributeError deep in the card)."""
    for key, types in expected.items():
        value = data.get(key)
        if value is None:
            continue
        if isinstance(types, dict):
            if not isinstance(value, dict):
                raise CardInputError(f"{path}: {prefix}{key} is {type(value).__name__}, expected an object")
            _check_types(path, value, types, f"{prefix}{key}.")
        elif not isinstance(value, types) or isinstance(value, bool) and bool not in (
                types if isinstance(types, tuple) else (types,)):
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise CardInputError(f"{path}: {prefix}{key} is {type(value).__name__}, expected {names}")


def _check_items(path: str, values, item_type: type, where: str) -> None:
    for index, item in enumerate(values or ()):
        if not isinstance(item, item_type):
            raise CardInputError(f"{path}: {where}[{index}] is {type(item).__name__}, expected {item_type.__name__}")


EVAL_HEADER = {"model": {"path": str, "fingerprint": str, "tokenizer_fingerprint": str},
               "environment": {"device": str, "python": str, "packages": dict}}
EVAL_DATASET = {"num_queries": int, "num_docs": int, "data_fingerprint": str, "metrics": dict,
                "bm25": {"library": str, "metrics": dict}, "production": dict}
TRAINING_LOG = {"recipe": dict, "history": list, "clfr": list, "crashes": dict, "eval": dict}


def read_eval(path: str) -> dict:
    data = read_json(path, "eval results")
    if not isinstance(data.get("datasets"), dict) or not data["datasets"]:
        raise CardInputError(f"{path}: no 'datasets' object; expected the eval_fles1.py --output format")
    _check_types(path, data, EVAL_HEADER)
    for name, entry in data["datasets"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("metrics"), dict):
            raise CardInputError(f"{path}: datasets.{name} has no 'metrics' object")
        _check_types(path, entry, EVAL_DATASET, f"datasets.{name}.")
        if not isinstance(entry.get("split"), str) or not entry["split"]:  # eval_fles1.py always records it
            raise CardInputError(f"{path}: datasets.{name}.split is {entry.get('split')!r}, expected the split's "
                                 "name (e.g. 'test')")
        tables = {"metrics": entry["metrics"], "bm25.metrics": (entry.get("bm25") or {}).get("metrics"),
                  "production": entry.get("production")}
        for table_name, values in tables.items():
            for key, value in (values.items() if isinstance(values, dict) else ()):
                if number(value) is not None and not math.isfinite(value):  # a diverged model or a broken eval
                    raise CardInputError(f"{path}: datasets.{name}.{table_name}.{key} is {value}: a card publishes "
                                         "finite numbers only (re-run the evaluation)")
    return data


def read_training_log(path: str) -> dict:
    data = read_json(path, "training log")
    if "recipe" not in data and "history" not in data:
        raise CardInputError(f"{path}: neither 'recipe' nor 'history'; expected a train_fles1.py training_log.json")
    _check_types(path, data, TRAINING_LOG)
    _check_items(path, data.get("history"), dict, "history")
    _check_items(path, data.get("clfr"), dict, "clfr")
    return data


def read_recipe(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)  # JSON is YAML too
    except FileNotFoundError as error:
        raise CardInputError(f"{path}: recipe file not found") from error
    except OSError as error:
        raise CardInputError(f"{path}: cannot read the recipe file ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise CardInputError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise CardInputError(f"{path}: expected a mapping of recipe values")
    return data


# ---- grouping ---------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """All datasets evaluated for one model, merged from one or more eval JSONs."""

    key: str
    model_path: Optional[str]
    header: dict  # threshold, max lengths, environment of the first file
    datasets: dict = field(default_factory=dict)  # name -> dataset entry
    sources: dict = field(default_factory=dict)  # name -> file it came from
    devices: dict = field(default_factory=dict)  # name -> the device its file was evaluated on
    training_log: Optional[dict] = None
    training_log_path: Optional[str] = None

    @property
    def seed(self):
        return None if self.training_log is None else self.training_log.get("seed")


def group_runs(evals: Sequence[tuple[str, dict]]) -> list[Run]:
    runs: dict[str, Run] = {}
    for path, data in evals:
        model = data.get("model") or {}
        key = str(model.get("fingerprint") or model.get("path") or path)
        run = runs.setdefault(key, Run(key=key, model_path=model.get("path"), header=data))
        _check_same_settings(path, data, run.header, next(iter(run.sources.values()), path))
        for name, entry in data["datasets"].items():
            if name in run.datasets:  # the card has one row per dataset: one split of it
                here, there = entry.get("split"), run.datasets[name].get("split")
                splits = f" (split {here!r} here, {there!r} there)" if here != there else ""
                raise CardInputError(f"{path}: dataset {name!r} of model {key!r} is already in {run.sources[name]}"
                                     f"{splits}; the card shows one split per dataset")
            run.datasets[name] = entry
            run.sources[name] = path
            run.devices[name] = (data.get("environment") or {}).get("device")
    return list(runs.values())


SETTINGS = ("threshold", "query_max_length", "document_max_length")


def _check_same_settings(path: str, data: dict, reference: dict, reference_path: str) -> None:
    """The card states one threshold and one pair of max lengths: every file must have been evaluated with them."""
    for key in SETTINGS:
        if data.get(key) != reference.get(key):
            raise CardInputError(f"{path}: {key} {data.get(key)!r}, but {reference_path} has {reference.get(key)!r}; "
                                 "the card's tables share one setting (evaluate again with the same one)")


def attach_training_logs(runs: list[Run], logs: Sequence[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Pair each run with the training log written into its model folder (else the one beside its results file);
    returns the logs left unpaired."""
    unpaired = []
    for path, log in logs:
        recorded = log.get("model_fingerprint")  # train_fles1.py records the model it saved
        if isinstance(recorded, str):
            match = next((r for r in runs if r.training_log is None and r.key == recorded), None)
            if match is not None:
                match.training_log, match.training_log_path = log, path
            else:  # another model's (a seed without results here, a model changed since): shown beside as its
                unpaired.append((path, log))  # own row, never taken as the published model's (below)
            continue
        # beside the log, and beside the file a link to it points to
        folders = {os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.dirname(os.path.realpath(path))}
        output_dir = (log.get("recipe") or {}).get("output_dir")
        if isinstance(output_dir, str):
            folders.add(os.path.realpath(output_dir))
        # the model its folder holds (by fingerprint: a results file's model path is relative to where it was
        # evaluated), else the model path
        held = {_fingerprint_of(folder) for folder in folders} - {None}
        match = next((r for r in runs if r.training_log is None and r.key in held), None) or next(
            (r for r in runs if r.training_log is None and r.model_path and os.path.realpath(r.model_path) in folders),
            None)
        if match is None:  # else beside the run's results file (results/runs/<run>/), if no other run is there
            beside = [r for r in runs if r.training_log is None and folders & _results_folders(r)]
            match = beside[0] if len(beside) == 1 else None
        if match is None and held and not held & {run.key for run in runs}:
            # its folder holds a model no results file evaluated: the card would show that run's steps, loss and
            # training data as the published model's
            raise CardInputError(f"{path}: its folder holds a model (fingerprint {', '.join(sorted(held))}) that no "
                                 "results file evaluated; leave the log out, or pass that model's results too")
        if match is None:
            unpaired.append((path, log))
        else:
            match.training_log, match.training_log_path = log, path
    # one run and one log that records no model (written before logs did): taken as that run's (e.g. a results/
    # folder holding copies of both), said, as nothing proves it
    if len(runs) == 1 and runs[0].training_log is None and len(unpaired) == 1 \
            and not isinstance(unpaired[0][1].get("model_fingerprint"), str):
        warnings.warn(f"{unpaired[0][0]} records no model fingerprint (a log written before train_fles1.py recorded "
                      f"one): taken as the log of the one model evaluated ({runs[0].key}); check that it trained "
                      "that model", stacklevel=2)
        (runs[0].training_log_path, runs[0].training_log), unpaired = unpaired[0], []
    return unpaired


def _fingerprint_of(folder: str) -> Optional[str]:
    """`fles1.evaluation.model_fingerprint` of a FLES-1 folder (sharded too), None where it holds no model."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return None
    from fles1.evaluation import model_fingerprint  # here: it imports the encoder (torch)
    from fles1_encoder import CheckpointError

    try:
        return model_fingerprint(folder)
    except CheckpointError:  # no weights there
        return None


def _results_folders(run: Run) -> set:
    return {os.path.realpath(os.path.dirname(os.path.abspath(path))) for path in run.sources.values()}


# ---- formatting -------------------------------------------------------------------------------------------------
def number(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def fmt(value, digits: int = 4) -> str:
    value = number(value)
    return MISSING if value is None else f"{value:.{digits}f}"


def fmt_sci(value) -> str:
    value = number(value)
    return MISSING if value is None else f"{value:.3g}"


def fmt_metric(key: str, value) -> str:
    return fmt(value, 1 if key in SPARSITY_METRICS else 4)


def fmt_production(key: str, value) -> str:
    value = number(value)
    if value is None:
        return MISSING
    if key == "index_bytes_per_1k_docs":
        return f"{value / 1e6:.3f}"
    if key == "index_ratio_to_dense_768":
        return f"{value:.3f}×"
    return f"{value:.1f}" if key == "docs_per_second" else f"{value:.2f}"


def distinct_names(paths: Sequence[str]) -> dict[str, str]:
    """Each path's shortest tail of folders that no other path shares (runs/a/eval_test.json, runs/b/eval_test.json
    -> a/eval_test.json, b/eval_test.json); the full path where no tail is unique (the same file twice)."""
    parts = {path: os.path.normpath(path).split(os.sep) for path in paths}
    names = {}
    for path, own in parts.items():
        for depth in range(1, len(own) + 1):
            tail = own[-depth:]
            if all(other[-depth:] != tail for other_path, other in parts.items() if other_path != path):
                names[path] = "/".join(tail)
                break
        else:
            names[path] = path
    return names


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


LOCAL_ABSOLUTE_PATH = re.compile(r"^(/|[A-Za-z]:[\\/]|\\\\)[^\n]*$")  # /home/..., C:\..., \\server\...
# an absolute path inside a text (a note naming a file): not after a word, dot or colon (../x, a/b, https://)
EMBEDDED_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/\\])(?:/|[A-Za-z]:[\\/])[^\s:;,()'\"]+")


def without_local_paths(value):
    """`value` (JSON-like) with each absolute local path in its strings cut to its last component: a published card
    or results file must not show the publisher's folders (``/home/<user>/...``). A string that is a path (spaces
    allowed) becomes its last component; in other text (a note: "<path>: no dev split; ...") each path does.
    Relative paths (``../shared/...``), hub ids and URLs stay.

    >>> without_local_paths({"model": {"path": "/home/alice/runs/fles1"}, "data": ["../shared/data/nfcorpus"]})
    {'model': {'path': 'fles1'}, 'data': ['../shared/data/nfcorpus']}
    >>> without_local_paths("/home/alice/triples.tsv: no BEIR dev split (qrels/dev.tsv); skipped")
    'triples.tsv: no BEIR dev split (qrels/dev.tsv); skipped'
    """
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    if not isinstance(value, str):
        return value
    if LOCAL_ABSOLUTE_PATH.match(value) and not re.search(r"[:;,] ", value):  # the whole string is a path
        return _last_component(value)
    return EMBEDDED_ABSOLUTE_PATH.sub(lambda match: _last_component(match.group()), value)


# secrets a log or recipe may hold: a Hugging Face token (hub_token is a TrainingArguments setting), keys so named,
# credentials in a URL
HF_TOKEN_TEXT = re.compile(r"hf_[A-Za-z0-9]{20,}")
SECRET_KEY = re.compile(r"(^|\.)token$|(^|[._-])((hub|hf|auth|access|api|bearer|refresh)[_-]?token|api[_-]?key|"
                        r"password|passwd|secret|access[_-]key|credentials?)$", re.IGNORECASE)  # not pad_token
URL_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
REDACTED = "<redacted>"


def publishable(value, key: str = ""):
    """`value` as a published card, results or log file may show it: without absolute local paths
    (`without_local_paths`) and without secrets -- the value of a key named like one (``hub_token``, ``api_key``),
    Hugging Face tokens and URL credentials anywhere in text -- each replaced by ``<redacted>``.

    >>> publishable({"training": {"hub_token": "hf_" + "x" * 34, "seed": 1}, "url": "https://me:pw@host/x"})
    {'training': {'hub_token': '<redacted>', 'seed': 1}, 'url': 'https://<redacted>@host/x'}
    """
    if isinstance(value, dict):
        return {name: publishable(item, str(name)) for name, item in value.items()}
    if isinstance(value, list):
        return [publishable(item, key) for item in value]
    if not isinstance(value, str):
        return value
    if SECRET_KEY.search(key) and value:
        return REDACTED
    value = HF_TOKEN_TEXT.sub(REDACTED, without_local_paths(value))
    return URL_CREDENTIALS.sub(lambda match: f"{match.group(1)}{REDACTED}@", value)


def _last_component(path: str) -> str:
    return re.split(r"[\\/]", path.rstrip("/\\"))[-1] or path


def cell(value, none: str = MISSING) -> str:
    if value is None:
        return none
    text = json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)
    return text.replace("|", "\\|")


MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def markdown_text(text) -> str:
    """`text` shown as itself in Markdown, a table cell included: a dataset folder named ``a|b`` split its row."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def dataset_id(name: str) -> str:
    """Hub id of an evaluated dataset: BEIR datasets live under BeIR/, anything else keeps its name."""
    return name if "/" in name else (f"BeIR/{name}" if name.lower() in BEIR_NAMES else name)


LOCAL_FOLDER = "local folder"  # an eval results entry's data_source for a dataset read from a folder


# Corpus sizes of the BEIR datasets on the Hub (BEIR's table): a local folder of a BEIR name and another size is a
# subset (or another corpus), not BeIR/<name> -- the card declared it so, with a rerun command that cannot give
# its numbers.
BEIR_CORPUS_SIZES = {"arguana": 8674, "climate-fever": 5416593, "dbpedia-entity": 4635922, "fever": 5416568,
                     "fiqa": 57638, "hotpotqa": 5233329, "msmarco": 8841823, "nfcorpus": 3633, "nq": 2681468,
                     "quora": 522931, "scidocs": 25657, "scifact": 5183, "trec-covid": 171332,
                     "webis-touche2020": 382545, "touche2020": 382545}


def _other_corpus(name: str, entry: dict) -> Optional[int]:
    """BeIR/<name>'s corpus size where the evaluated folder holds another number of documents, else None."""
    size = BEIR_CORPUS_SIZES.get(name.lower())
    return size if size is not None and entry.get("num_docs") != size else None


def local_only(name: str, entry: dict) -> bool:
    """An evaluated dataset that was a local folder and is no Hub dataset (a BEIR name stands for BeIR/<name> when
    the folder holds that dataset's corpus size): not the card's metadata, and its rerun command needs the folder.
    Results written before eval recorded the source count as Hub data."""
    if entry.get("data_source") != LOCAL_FOLDER or "/" in name:
        return False
    return name.lower() not in BEIR_NAMES or _other_corpus(name, entry) is not None


def _subset_note(name: str, entry: dict) -> str:
    """For a local folder of a BEIR name and another corpus size: how it differs from the Hub's."""
    size = _other_corpus(name, entry)
    return "" if size is None else f" of {entry.get('num_docs')} documents ({dataset_id(name)} has {size:,})"


def shown_dataset(name: str, entry: dict) -> str:
    """The card's id of an evaluated dataset: its Hub id, or its name for a local-only one."""
    return name if local_only(name, entry) else dataset_id(name)


def hub_id_or_none(value, local: Optional[bool] = None) -> Optional[str]:
    """`value` if it reads as a Hub id and was not a local path: ``local`` as the training log recorded it, else
    (older logs, arguments) whether it exists here."""
    local = os.path.exists(value) if local is None and isinstance(value, str) else local
    if isinstance(value, str) and HUB_ID.match(value) and not local:
        return value
    return None


def recipe_hub_id(train_recipe: dict, key: str) -> Optional[str]:
    """A flattened recipe's value as a Hub id, None for a local path: training records which were local
    (resolved.local_paths); judged from this folder instead, `outputs/bb` became the card's base model."""
    recorded = train_recipe.get("resolved.local_paths")
    local = (key in recorded) if isinstance(recorded, list) and key in ("model.path", "data.source") else None
    return hub_id_or_none(train_recipe.get(key), local)


# ---- sections ---------------------------------------------------------------------------------------------------
def headline_section(run: Run) -> str:
    rows = [[markdown_text(name), entry.get("split", MISSING)] + [fmt_metric(k, entry["metrics"].get(k))
                                                                  for k in METRICS]
            for name, entry in run.datasets.items()]
    return table(["Dataset", "Split", *METRICS.values()], rows)


def reproducibility_section(runs: list[Run], primary_dataset: str, name_of) -> str:
    runs = [run for run in runs if primary_dataset in run.datasets]
    keys = ["ndcg@10", "mrr@10", "recall@100", "nnz_doc", "nnz_query"]
    rows = []
    for index, run in enumerate(runs):
        metrics = run.datasets[primary_dataset]["metrics"]
        label = "published" if index == 0 else f"run {index + 1}"
        rows.append([label, cell(run.seed), f"`{cell(name_of(run.sources[primary_dataset]))}`"]
                    + [fmt_metric(k, metrics.get(k)) for k in keys])
    text = f"{primary_dataset}, one row per evaluated run:\n\n"
    values = {k: [number(run.datasets[primary_dataset]["metrics"].get(k)) for run in runs] for k in keys}
    if len(runs) >= 2:
        summary = []
        for key in keys:
            present = [v for v in values[key] if v is not None]
            digits = 1 if key in SPARSITY_METRICS else 4
            summary.append(f"{statistics.mean(present):.{digits}f} ± {statistics.stdev(present):.{digits}f}"
                           if len(present) >= 2 else MISSING)
        rows.append([f"mean ± std (n={len(runs)})", "", ""] + summary)
        text += table(["Run", "Seed", "Results file", *(METRICS[k] for k in keys)], rows)
        text += "\n\nstd is the sample standard deviation over the runs that report the metric."
    else:
        text += table(["Run", "Seed", "Results file", *(METRICS[k] for k in keys)], rows)
        text += "\n\nOne run: no spread across seeds is reported."
    return text


def environment_section(run: Run) -> str:
    environment = run.header.get("environment") or {}
    packages = environment.get("packages") or {}
    model = run.header.get("model") or {}
    lines = [f"- Model fingerprint: `{model.get('fingerprint') or MISSING}`",
             f"- Device: {environment.get('device') or MISSING}; Python {environment.get('python') or MISSING}",
             "- Packages: " + (", ".join(f"{k} {v}" for k, v in sorted(packages.items())) or MISSING)]
    lines += [f"- Data fingerprint ({markdown_text(name)}): `{entry.get('data_fingerprint') or MISSING}` "
              "(sha256 of the BEIR folder's "
              f"corpus.jsonl, queries.jsonl and qrels/{entry.get('split') or 'SPLIT'}.tsv; a dataset loaded by hub id "
              "is fingerprinted by its id and sizes instead)" for name, entry in run.datasets.items()]
    return "\n".join(lines)


def baselines_section(run: Run) -> str:
    rows = []
    for name, entry in run.datasets.items():
        bm25 = entry.get("bm25") or {}
        label = f"BM25 ({bm25['library']})" if bm25.get("library") else "BM25 (not run in this evaluation)"
        rows.append([markdown_text(name), "FLES-1"] + [fmt(entry["metrics"].get(k)) for k in IR_METRICS])
        rows.append([markdown_text(name), label] + [fmt((bm25.get("metrics") or {}).get(k)) for k in IR_METRICS])
    return table(["Dataset", "System", *IR_METRICS.values()], rows)


def training_corpora(train_recipe: dict) -> Optional[set[str]]:
    """Lower-cased names of the corpora the recipe trained on (a folder's name, a hub id's last part), None when no
    recipe says -- or when one is triples (a TSV names no corpus: its rows may come from any)."""
    sources = [train_recipe.get(key) for key in TRAIN_DATA_KEYS if isinstance(train_recipe.get(key), str)]
    if not sources or any(_is_triples(source) for source in sources):
        return None
    return {os.path.basename(os.path.normpath(source)).lower() for source in sources}


def _is_triples(source: str) -> bool:
    """The training loader's own rule where the path is here; else (a card built elsewhere) a TSV-like name."""
    if os.path.exists(source):
        from fles1.training.data import triples_file

        return triples_file(source) is not None
    return source.lower().endswith((".tsv", ".tsv.gz", ".csv", ".txt"))


def cross_domain_section(run: Run, trained_on: Optional[set[str]], training_split: Optional[str] = None) -> str:
    """One row per dataset, each marked in-domain (its corpus is the training data's) or zero-shot; in-domain and
    scored on the split the recipe trained on (`training_split`) is said, and warned about: those numbers measure
    the training data, not the model."""
    rows = []
    for name, entry in run.datasets.items():
        metrics, bm25 = entry["metrics"], (entry.get("bm25") or {}).get("metrics") or {}
        relation = MISSING if trained_on is None else "in-domain" if name.lower() in trained_on else "zero-shot"
        if relation == "in-domain" and training_split is not None and entry.get("split") == training_split:
            relation = "in-domain, **trained on this split**"
            warnings.warn(f"{name}: scored on its {training_split!r} split, the split the recipe trained on; the card "
                          "says so in its per-dataset table", stacklevel=2)
        rows.append([markdown_text(name), relation, cell(entry.get("split")), cell(entry.get("num_queries")),
                     cell(entry.get("num_docs")), fmt(metrics.get("ndcg@10")), fmt(metrics.get("recall@100")),
                     fmt(bm25.get("ndcg@10")), fmt_metric("nnz_doc", metrics.get("nnz_doc"))])
    return table(["Dataset", "Training data", "Split", "Queries", "Docs", "NDCG@10", "Recall@100", "BM25 NDCG@10",
                  "NNZ doc"], rows)


def devices(run: Run) -> set:
    """The devices the run's files were evaluated on: several when files measured elsewhere were merged (the card
    named the first file's device over every row)."""
    return set(run.devices.values()) or {(run.header.get("environment") or {}).get("device")}


def measured_on(run: Run) -> str:
    """For the sentence above the production table: the one device, or the table's Device column."""
    found = devices(run)
    return (found.pop() or MISSING) if len(found) == 1 else "the device in each row"


def production_section(run: Run) -> str:
    rows, cached = [], []
    per_row_device = len(devices(run)) > 1
    # docs/s depends on the batch size (files written before it was recorded have none: no column of dashes)
    batches = any((entry.get("production") or {}).get("docs_per_second_batch_size") for entry in run.datasets.values())
    for name, entry in run.datasets.items():
        production = entry.get("production") or {}
        row = [markdown_text(name)] + [fmt_production(k, production.get(k)) for k in PRODUCTION]
        if batches:
            row.insert(2, cell(production.get("docs_per_second_batch_size")))
        if production.get("docs_per_second_from_cache"):  # measured by the run that encoded the corpus
            row[1] = f"{row[1]}*"
            when = [markdown_text(value) for value in (production.get("docs_per_second_device"),
                                                       production.get("docs_per_second_encoded_at")) if value]
            cached.append(markdown_text(name) + (f" ({', '.join(when)})" if when else ""))
        if per_row_device:
            row.append(markdown_text(run.devices.get(name) or MISSING))
        rows.append(row)
    note = ("\n\n\\* Docs/s of the earlier run that encoded the corpus (the vectors came from the cache): "
            f"{'; '.join(cached)}." if cached else "")
    header = ["Dataset", *PRODUCTION.values()]
    if batches:
        header.insert(2, "Batch")
    return table(header + (["Device"] if per_row_device else []), rows) + note


def rerun_commands(run: Run, repo_id: str, revision: Optional[str] = None) -> str:
    """The eval_fles1.py command(s) that evaluate the published model as `run` did: one per split (one command
    evaluates every --data on one --split), each argument shell-quoted. A model on a branch other than main is
    downloaded first (eval_fles1.py loads a hub id's main branch)."""
    model, download = repo_id, ""
    if revision_argument(revision):
        model = f"{repo_id.split('/')[-1]}-{revision.replace('/', '-')}"
        download = (f"hf download {shlex.quote(repo_id)} --revision {shlex.quote(revision)} "
                    f"--local-dir {shlex.quote(model)}\n")
    by_split: dict[str, list[str]] = {}
    local = [f"# {' '.join(name.split())}: a local BEIR folder{_subset_note(name, entry)}, not on the Hub (data "
             f"fingerprint {entry.get('data_fingerprint')}): give its path as --data"
             for name, entry in run.datasets.items() if local_only(name, entry)]
    for name, entry in run.datasets.items():
        by_split.setdefault(entry.get("split") or "test", []).append(shown_dataset(name, entry))
    threshold = run.header.get("threshold")
    return download + "".join(f"{line}\n" for line in local) + "\n".join(
        f"python eval_fles1.py --model {shlex.quote(model)} --data {' '.join(shlex.quote(d) for d in datasets)} "
        f"--split {shlex.quote(split)}" + (f" --threshold {threshold}" if threshold is not None else "")
        + f" --output {shlex.quote(f'results_{split}.json' if len(by_split) > 1 else 'results.json')}"
        for split, datasets in by_split.items())


def check_license_id(license) -> None:
    if not isinstance(license, str) or not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        raise CardInputError(f"license {license!r} is not a Hub license id (lower case, e.g. apache-2.0, mit, "
                             "cc-by-nc-4.0, other)")


GIT_REF_FORBIDDEN = re.compile(r"[\s~^:?*\[\\\x00-\x1f\x7f]|\.\.|@\{")


def check_repo_id(repo_id: str, label: str = "repo id") -> None:
    """A Hub repo id with its owner (``label`` starts the error, e.g. the flag that gave it): an owner-less id
    lands under the uploader's account, where the card's snippets would not find it."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise CardInputError(f"{label} {repo_id!r} is not a Hub repo id ({error})") from None
    if "/" not in repo_id:
        raise CardInputError(f"{label} {repo_id!r} names no owner: the card's snippets load the repo by this id; give "
                             f"it as <user or organization>/{repo_id} (e.g. mindoval/fles1-v14)")


def check_revision(revision: Optional[str]) -> None:
    """A branch name git can create (git check-ref-format): the card names it in every snippet, and the Hub
    refused it only at upload, after the assembly and validation."""
    if revision is None:
        return
    parts = revision.split("/") if isinstance(revision, str) else [""]
    if not revision or revision in ("@", "HEAD") or GIT_REF_FORBIDDEN.search(revision) or revision.startswith("-") \
            or revision.endswith(".") or any(not part or part.startswith(".") or part.endswith(".lock")
                                             for part in parts):
        raise CardInputError(f"revision {revision!r} is not a branch name git can create (not HEAD; no spaces, '..', "
                             "'@{', any of ~^:?*[\\, a leading '-', an empty part between '/', a part that starts "
                             "with '.' or ends with '.lock', or a trailing '.')")


def revision_argument(revision: Optional[str]) -> str:
    """The card's snippets load what the push committed: a branch other than main is named in each of them."""
    return "" if revision in (None, "", "main") else f", revision={json.dumps(revision)}"


# recipe keys that truncate the training texts (train_fles1.py), not what the saved model encodes with
TRAINING_LENGTH_KEYS = ("model.query_max_length", "model.document_max_length")


def _lone_log(runs: list[Run], extra_logs: Sequence[tuple[str, dict]]) -> Optional[dict]:
    """A log paired with no run, taken as the published run's (its recipe shown as the run's): the only one, where
    no run has a log, and naming no model (one that names its model is another one's); another seed's never is."""
    if len(extra_logs) == 1 and not any(run.training_log for run in runs) \
            and not isinstance(extra_logs[0][1].get("model_fingerprint"), str):
        return extra_logs[0][1]
    return None


def training_section(runs: list[Run], extra_logs: Sequence[tuple[str, dict]], recipe: Optional[dict],
                     header: Optional[dict] = None) -> str:
    """``header``: the published run's eval header, whose max lengths are the ones the model encodes with."""
    logs = [(run.training_log_path, run.training_log) for run in runs if run.training_log] + list(extra_logs)
    lone = _lone_log(runs, extra_logs)
    # a log of no model evaluated here: marked in every table, said under them (the rows read as this model's)
    others = {id(log) for _, log in extra_logs if log is not lone}
    seed = lambda log: cell(log.get("seed")) + (" †" if id(log) in others else "")  # noqa: E731
    other_runs = "" if not others else "\n\n† " + "; ".join(
        f"`{os.path.basename(path)}` records "
        + (f"model {log['model_fingerprint']}" if isinstance(log.get("model_fingerprint"), str) else "no model")
        for path, log in extra_logs if id(log) in others) + ": a run of a model no results file on this card " \
        "evaluates, not the published model's training."
    if recipe is None and logs:  # the published run's, or the lone log's taken as its
        recipe = (runs[0].training_log or lone or {}).get("recipe")
    if recipe is None and not logs:
        return f"No training log or recipe was given: training details are {MISSING}."
    parts = []
    flat = flatten(recipe or {})
    if flat:
        recipe_part = "### Recipe\n\n" + table(["Setting", "Value"],
                                                 [[f"`{k}`", cell(publishable(v, k), "null")]
                                                  for k, v in flat.items()])
        training_lengths = [f"`{key}`" for key in TRAINING_LENGTH_KEYS if flat.get(key) is not None]
        if training_lengths:  # they read like the model's own lengths, which config.json keeps (the card's top)
            inference = header or {}
            recipe_part += (f"\n\n{' and '.join(training_lengths)} cut the training texts only; the model encodes "
                            f"queries at {cell(inference.get('query_max_length'))} and documents at "
                            f"{cell(inference.get('document_max_length'))} tokens (config.json).")
        parts.append(recipe_part)
    clfr_settings = {k: v for k, v in flat.items() if CLFR_KEY.search(k)}
    clfr = ["### CLFR (closed-loop FLOPS regularization)",
            "Every interval the controller measures the documents' average NNZ and moves λ_d toward the target."]
    if clfr_settings:
        clfr.append(table(["Setting", "Value"], [[f"`{k}`", cell(v, "null")] for k, v in clfr_settings.items()]))
    rows = []
    for path, log in logs:
        updates = log.get("clfr") or []
        first, last = (updates[0], updates[-1]) if updates else ({}, {})
        rows.append([seed(log), str(len(updates)), fmt_sci(first.get("lambda_d_before")),
                     fmt_sci(last.get("lambda_d_after")), fmt(last.get("measured_nnz"), 1),
                     fmt(last.get("target_nnz"), 1)])
    if rows:
        clfr.append(table(["Seed", "Adjustments", "λ_d first", "λ_d last", "NNZ measured (last)", "Target NNZ"], rows)
                    + other_runs)
    parts.append("\n\n".join(clfr))
    if logs:
        rows = []
        for path, log in logs:
            crashes = log.get("crashes") or {}
            history = log.get("history") or []
            final = history[-1] if history else {}
            rows.append([seed(log), cell(log.get("global_step")), fmt(log.get("train_runtime_s"), 0),
                         fmt(final.get("loss")), fmt(final.get("nnz_doc"), 1), fmt(final.get("nnz_query"), 1)]
                        + [cell(crashes.get(kind)) for kind in CRASH_KINDS])
        parts.append(
            "### Runs and crash counts\n\nA crash is a non-finite loss or gradient (the update is skipped), a loss "
            "spike over the running median, or the document NNZ collapsing below its floor.\n\n"
            + table(["Seed", "Steps", "Runtime (s)", "Final loss", "Final NNZ doc", "Final NNZ query",
                     "Non-finite loss", "Non-finite grad", "Loss spike", "NNZ collapse", "Total"], rows)
            + other_runs)
    dev = [log for _, log in logs if isinstance(log.get("eval"), dict)
           and any(number(log["eval"].get(k)) is not None for k in METRICS)]
    if dev:
        rows = [[seed(log), cell(log["eval"].get("split"))] + [fmt_metric(k, log["eval"].get(k)) for k in METRICS]
                for log in dev]
        parts.append("### Dev metrics at the end of training\n\n"
                     + table(["Seed", "Split", *METRICS.values()], rows)
                     + (other_runs if any(id(log) in others for log in dev) else ""))
    return "\n\n".join(parts)


def model_index(run: Run) -> list[EvalResult]:
    """One EvalResult per dataset and metric, values copied unrounded from the eval JSON."""
    results = []
    for name, entry in run.datasets.items():
        for key, label in METRICS.items():
            value = number(entry["metrics"].get(key))
            if value is None:
                continue
            results.append(EvalResult(
                task_type="text-retrieval", task_name="Retrieval", dataset_type=shown_dataset(name, entry),
                dataset_name=name, dataset_split=entry.get("split"), metric_type=key.replace("@", "_at_"),
                metric_name=label, metric_value=entry["metrics"][key],
            ))
    return results


# ---- the card ---------------------------------------------------------------------------------------------------
def build_card(
    results: Sequence[str],
    training_logs: Sequence[str] = (),
    recipe: Optional[str] = None,
    repo_id: str = "mindoval/fles1-v14",
    base_model: Optional[str] = None,
    plots: Sequence[str] = (),
    template_path: str = TEMPLATE_PATH,
    result_names: Optional[dict] = None,
    studies: Optional[str] = None,
    revision: Optional[str] = None,
    license: str = LICENSE,
    license_file: str = "LICENSE",
) -> ModelCard:
    """Model card from result files. ``plots`` are paths relative to the card (they are linked, not read);
    ``result_names`` maps a results path to the name the card shows for it (default: its file name, with as many
    parent folders as tell it from the others: ``seed1/eval_test.json``);
    ``studies`` is a Markdown file of study tables generated from result files (experiments/summarize.py),
    embedded as is; ``revision``: the branch the card's snippets and rerun command load (default: main);
    ``license``: a Hub license id ("other": the repository's ``license_file``; fles1.checkpoint.license_of)."""
    check_license_id(license)
    check_repo_id(repo_id)  # the card names it in its snippets, rerun commands and model-index
    check_revision(revision)
    short = distinct_names(results)
    name_of = lambda path: (result_names or {}).get(path) or short.get(path, os.path.basename(path))  # noqa: E731
    if not results:
        raise CardInputError("at least one eval results JSON is needed (eval_fles1.py --output)")
    runs = group_runs([(path, read_eval(path)) for path in results])
    extra_logs = attach_training_logs(runs, [(path, read_training_log(path)) for path in training_logs])
    lone = _lone_log(runs, extra_logs)
    for path, log in extra_logs:
        recorded = log.get("model_fingerprint")
        if log is lone:
            continue
        which = f"of model {recorded}, which no results file evaluates" if isinstance(recorded, str) else \
            "naming no model, paired with no results file by its folder"
        warnings.warn(f"{path}: a training log {which}: shown marked as another run, not as the published model's "
                      "training (pass that model's results to pair them)", stacklevel=2)
    recipe_values = read_recipe(recipe) if recipe else None
    primary = runs[0]
    primary_dataset = next(iter(primary.datasets))
    for run in runs[1:]:  # further runs feed the reproducibility table, on the published model's first dataset
        first = next(iter(run.sources.values()))
        _check_same_settings(first, run.header, primary.header, next(iter(primary.sources.values())))
        if primary_dataset not in run.datasets:
            raise CardInputError(f"{first}: no {primary_dataset} result, the dataset the reproducibility table "
                                 f"compares runs on; pass that run's {primary_dataset} results, or leave it out")
        here, published = run.datasets[primary_dataset].get("split"), primary.datasets[primary_dataset].get("split")
        if here != published:  # the table's mean and std would mix splits
            raise CardInputError(f"{run.sources[primary_dataset]}: {primary_dataset} split {here!r}, but the published "
                                 f"run's ({primary.sources[primary_dataset]}) is {published!r}; the reproducibility "
                                 "table compares runs on one split: pass every run's results on that split")
        for key in ("num_docs", "num_queries", "data_fingerprint"):  # its mean and std would mix corpora
            here, published = run.datasets[primary_dataset].get(key), primary.datasets[primary_dataset].get(key)
            if here is None or published is None or here == published:
                continue
            if key != "data_fingerprint":
                raise CardInputError(f"{run.sources[primary_dataset]}: {primary_dataset} {key} {here!r}, but the "
                                     f"published run's ({primary.sources[primary_dataset]}) is {published!r}: "
                                     "evaluated on other data; the reproducibility table compares runs on the same "
                                     "documents, queries and judgements")
            # the files' bytes: a copy with CRLF line ends, gzipped or loaded by hub id reads the same data
            warnings.warn(f"{run.sources[primary_dataset]}: {primary_dataset} was evaluated on files other than the "
                          f"published run's (data fingerprint {here} vs {published}) of the same size; the "
                          "reproducibility table takes them for the same data", stacklevel=2)
    if recipe_values is not None:
        _check_recipe_is_the_logs(recipe, recipe_values, primary)
    from fles1.training.recipe import DEFAULTS as RECIPE_DEFAULTS

    train_recipe = flatten(recipe_values or (primary.training_log or {}).get("recipe") or {})
    if base_model is not None and hub_id_or_none(base_model) is None:  # metadata and a huggingface.co link
        raise CardInputError(f"base model {base_model!r} is not a Hub model id (e.g. google-bert/bert-base-uncased)")
    base_model = base_model or next(
        (recipe_hub_id(train_recipe, k) for k in BASE_MODEL_KEYS if recipe_hub_id(train_recipe, k)), None)
    datasets = [dataset_id(name) for name, entry in primary.datasets.items() if not local_only(name, entry)]
    for name, entry in primary.datasets.items():
        note = _subset_note(name, entry) if local_only(name, entry) else ""
        if note:
            warnings.warn(f"{name}: a local folder{note}: shown as a local dataset, not as {dataset_id(name)}",
                          stacklevel=2)
    for key in TRAIN_DATA_KEYS:
        train_data = recipe_hub_id(train_recipe, key)
        if train_data and dataset_id(train_data) not in datasets:
            datasets.append(dataset_id(train_data))
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        model_name=model_name, license=license, library_name="sentence-transformers",
        **({"license_name": "backbone-license", "license_link": license_file} if license == "other" else {}),
        pipeline_tag="feature-extraction", tags=TAGS, base_model=base_model, datasets=datasets,
        language="en", eval_results=model_index(primary),
    )
    header = primary.header
    values = dict(
        model_name=model_name,
        repo_id=repo_id,
        revision_arg=revision_argument(revision),
        base_model=base_model,
        threshold=cell(header.get("threshold")),
        query_max_length=cell(header.get("query_max_length")),
        document_max_length=cell(header.get("document_max_length")),
        headline_table=headline_section(primary),
        headline_source=", ".join(f"`{name_of(p)}`" for p in dict.fromkeys(primary.sources.values())),
        reproducibility=reproducibility_section(runs, primary_dataset, name_of),
        environment=environment_section(primary),
        rerun=rerun_commands(primary, repo_id, revision),
        baselines=baselines_section(primary),
        cross_domain=cross_domain_section(primary, training_corpora(train_recipe),
                                          train_recipe.get("data.split", RECIPE_DEFAULTS["data"]["split"])),
        production=production_section(primary),
        device=measured_on(primary),
        training=training_section(runs, extra_logs, recipe_values, header),
        plots=[_image_link(path) for path in plots],
        evaluated_on=", ".join(f"{markdown_text(name)} ({entry.get('split', MISSING)})"
                               for name, entry in primary.datasets.items()),
        runs_note=("Results come from one training run; seed-to-seed spread is unknown." if len(runs) < 2 else
                   f"The spread over {len(runs)} runs is in the reproducibility table; more seeds narrow it."),
        license=LICENSE_TEXTS.get(license, f"{license}, the license of the backbone checkpoint this model was built "
                                           "from.").format(file=license_file) + DATASETS_LICENSE,
        studies=_read_text(studies) if studies else "",
    )
    _check_template_names(template_path, set(card_data.to_dict()) | set(values))
    return ModelCard.from_template(card_data, template_path=template_path, **values)


def _check_template_names(template_path: str, known: set) -> None:
    """Every name the template uses must be one the card fills: Jinja renders an unknown one (a typo, a renamed
    value) as empty text, and the card would ship with a hole."""
    import jinja2
    import jinja2.meta

    environment = jinja2.Environment()
    try:
        used = jinja2.meta.find_undeclared_variables(environment.parse(_read_text(template_path, "template")))
    except jinja2.TemplateSyntaxError as error:
        raise CardInputError(f"{template_path}:{error.lineno}: not a valid Jinja template ({error.message})") from None
    unknown = sorted(used - known - {"card_data"} - set(environment.globals))
    if unknown:
        raise CardInputError(f"{template_path}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                             f"filled by the card (it fills: {', '.join(sorted(known))})")


def _check_recipe_is_the_logs(path: str, values: dict, published: Run) -> None:
    """A recipe file given beside the published run's training log must be the recipe it was trained with (the
    log's includes the --set overrides): else the card's recipe tables contradict the run's own CLFR table. Other
    seeds' logs differ in their seeds; without the published run's log the file is the card's only recipe."""
    if not isinstance((published.training_log or {}).get("recipe"), dict):
        return
    log_path, trained = published.training_log_path, flatten(published.training_log["recipe"])
    differ = [f"{key} ({publishable(value, key)!r} here, {publishable(trained[key], key)!r} there)"
              for key, value in flatten(values).items() if key in trained and value != trained[key]]
    if differ:
        raise CardInputError(f"{path}: not the recipe {log_path} was trained with: {'; '.join(differ[:6])}"
                             f"{' ...' if len(differ) > 6 else ''}; leave the recipe out (the card then shows the "
                             "training log's)")


def _image_link(path: str) -> dict:
    """A relative image path as Markdown link parts: the URL percent-encoded (a space or parenthesis ends a bare
    link), brackets in the alt text escaped."""
    from urllib.parse import quote

    return {"alt": re.sub(r"([\[\]\\])", r"\\\1", path), "url": quote(path)}


def _read_text(path: str, kind: str = "studies") -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as error:
        raise CardInputError(f"{path}: cannot read the {kind} file ({error.strerror})") from None


__all__ = ["build_card", "CardInputError", "publishable", "group_runs", "model_index", "MISSING", "METRICS"]
