"""BEIR evaluation of a FLES-1 checkpoint: encode (cached), index, retrieve, score, time, report.

    >>> from fles1.evaluation import evaluate, markdown_tables
    >>> results = evaluate("outputs/fles1-tiny", ["../shared/data/nfcorpus"], threshold=0.3)
    >>> results["datasets"]["nfcorpus"]["metrics"]["ndcg@10"]
    >>> print(markdown_tables(results))

Documents are encoded once at threshold 0 and cached on disk (keyed by model fingerprint, corpus fingerprint,
document max length, projection dtype and `encoding_fingerprint`: the modeling and encoder code in use, the
tokenizer, torch version, device type); the evaluation threshold is applied afterwards with FLES1Encoder's own rule (weights >=
threshold), so one cache serves every threshold. Queries are encoded per run with the threshold passed
explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import time
import warnings
import zipfile
from importlib import metadata
from typing import Optional, Sequence

import numpy as np
import scipy.sparse
from scipy.sparse import csr_matrix
from tqdm.auto import tqdm

from fles1 import exports
from fles1.atomic import (atomic_directory, atomic_open, atomic_write_json, path_within, require_writable,
                          scratch_directory)
from fles1.beir import BEIRDataset, fingerprint_files, load_beir
from fles1.card import IR_METRICS, LOCAL_FOLDER, MISSING, SPARSITY_METRICS, markdown_text
from fles1.exports import check_elasticsearch_ids
from fles1.metrics import METRIC_KEYS, check_trec_ids, evaluate_run, rounded_run, write_trec_run
from fles1.retrieval import InvertedIndex, apply_threshold, average_nnz
from fles1_encoder import PROGRESS_BAR_MIN_TEXTS, dtype_name, safetensors_files

TOP_K = 1000
DENSE_768_BYTES_PER_DOC = 768 * 4  # float32 768-d vector: 3.07 MB per 1,000 docs
LATENCY_QUERIES = 100  # single-query timings per dataset (after a short warm-up)
LATENCY_TOP_K = 10  # a production search returns a page, not 1,000 hits
REPORTED_PACKAGES = (
    "torch", "transformers", "sentence-transformers", "scipy", "numpy", "pytrec-eval-terrier", "bm25s", "PyStemmer",
    "datasets",
)
DEFAULT_CACHE_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "fles1", "corpus"
)


# ---- fingerprints ----------------------------------------------------------------------------------------------
def _model_folder(model: str) -> str:
    """``model`` when it is a folder; for a hub id, the snapshot folder of its config and weights (the files
    FLES1Encoder.from_pretrained fetched: sharded ones too)."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    # the root's files only (fnmatch's * crosses folders: "*.safetensors" would fetch fp16/ copies too)
    return snapshot_download(model, allow_patterns=["config.json", "model.safetensors", "model.safetensors.index.json",
                                                    "model-*-of-*.safetensors"])


def model_fingerprint(model: str) -> str:
    """sha256 of model.safetensors (the shards, when sharded) + config.json (folder or hub id). Hashed once per
    process for the same files (path, size, modification time): publishing checks a folder's fingerprint, then the
    card pairs training logs by it."""
    folder = _model_folder(model)
    files = [*safetensors_files(folder), os.path.join(folder, "config.json")]
    key = tuple((os.path.realpath(path), os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in files)
    if key not in _MODEL_FINGERPRINTS:
        _MODEL_FINGERPRINTS[key] = fingerprint_files(files)
    return _MODEL_FINGERPRINTS[key]


_MODEL_FINGERPRINTS: dict[tuple, str] = {}


def weights_fingerprint(model) -> str:
    """sha256 of a loaded model's parameters and buffers (names, dtypes, shapes, values): the corpus cache's model
    key when no folder fingerprint is given -- a model trained or edited in memory gets its own entries."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def corpus_fingerprint(dataset: BEIRDataset) -> str:
    """Hash of what gets encoded (ids + "title text"), independent of queries, qrels and split. Each document is
    one JSON pair (tab-separated records let a text holding a newline, the next id and a tab hash like another
    corpus: its cached vectors were reused for that one)."""
    digest = hashlib.sha256()
    for doc_id in dataset.corpus:
        digest.update(json.dumps([doc_id, dataset.document_text(doc_id)], ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]


def encoding_fingerprint(encoder) -> str:
    """Hash of what turns text into vectors besides the weights: the model's modeling file (the checkpoint's own
    copy when loaded as remote code), the encoder's file, this file (`encode_corpus`), the tokenizer (its
    vocabulary, normalizer -- lowercasing -- and truncation side), the torch and transformers versions (BERT's
    arithmetic) and the device type."""
    import inspect

    import torch
    import transformers

    files = [inspect.getsourcefile(type(encoder.model)), inspect.getsourcefile(type(encoder)), __file__]
    digest = hashlib.sha256(fingerprint_files([f for f in files if f]).encode())
    digest.update(f"{torch.__version__}|{transformers.__version__}|{encoder.device.type}|"
                  f"{encoder.tokenizer.truncation_side}".encode())
    digest.update(tokenizer_fingerprint(encoder.tokenizer).encode())
    return digest.hexdigest()[:8]


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's definition: the Rust tokenizer's JSON without its per-call truncation/padding state, else
    (a Python tokenizer) its vocabulary and settings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None), definition.pop("padding", None)
    else:
        definition = {"vocab": sorted(tokenizer.get_vocab().items()), "settings": tokenizer.init_kwargs}
    return hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode()).hexdigest()[:16]


def environment(encoder) -> dict:
    packages = {}
    for name in REPORTED_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"packages": packages, "device": device_label(encoder.device), "python": platform.python_version()}


def device_label(device) -> str:
    """What the speed numbers were measured on: the model, cores and threads of a CPU, the model of a GPU ("cuda:0"
    alone did not tell an H200 from a T4; "cpu" alone not an AMD EPYC from a Xeon, ~2x apart on a query's latency)."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        model = cpu_model()
        return f"cpu ({model + ', ' if model else ''}{os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)



def cpu_model() -> Optional[str]:
    """The CPU's model name: /proc/cpuinfo's on Linux (x86: ARM's has none), `platform.processor()` on Windows (its
    family and model); None elsewhere (macOS and Linux's `platform.processor()` name the architecture only)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name") and ":" in line:
                    return " ".join(line.split(":", 1)[1].split()) or None
    except OSError:  # not Linux
        pass
    return (platform.processor() or None) if platform.system() == "Windows" else None

# ---- corpus encoding cache -------------------------------------------------------------------------------------
# Documents per cache shard. A corpus is encoded a shard at a time and each finished shard is saved, so an
# interrupted encoding resumes where it stopped: it loses at most one shard (~80 s on 2 CPU cores, a few seconds on
# a GPU). A corpus of up to this many documents (nfcorpus: 3,633) is one `encode_batch` call, as before sharding;
# a batch's padding moves vectors by ~1e-6, so the shard size is part of the cache key.
CORPUS_SHARD_DOCS = 8192


def _save_csr(path: str, matrix: csr_matrix, info: dict) -> None:
    with atomic_open(path, "wb") as handle:
        np.savez(
            handle, data=matrix.data, indices=matrix.indices.astype(np.int32, copy=False), indptr=matrix.indptr,
            shape=np.array(matrix.shape), info=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8),
        )


def _load_csr(path: str) -> tuple[csr_matrix, dict]:
    with np.load(path) as arrays:
        info = json.loads(arrays["info"].tobytes().decode())
        matrix = csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]),
                            shape=tuple(arrays["shape"].tolist()))
    return matrix, info


def _load_saved(path: str, rows: int) -> Optional[tuple[csr_matrix, dict]]:
    """A cache entry, or a finished shard saved by an earlier, interrupted run; None when there is none (or it cannot
    be read -- truncated by a full disk, say: then it is encoded again and replaced)."""
    if not os.path.isfile(path):
        return None
    try:
        matrix, info = _load_csr(path)
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile):
        return None  # EOFError: an empty file; TypeError: a .npy array, not an archive
    if matrix.shape[0] != rows or not isinstance(info.get("encode_seconds"), (int, float)):
        return None
    return matrix, info


def encode_corpus(
    encoder,
    dataset: BEIRDataset,
    cache_dir: Optional[str] = DEFAULT_CACHE_DIR,
    model_fp: Optional[str] = None,
    batch_size: int = 32,
    show_progress_bar: Optional[bool] = None,
    shard_docs: int = CORPUS_SHARD_DOCS,
) -> tuple[list[str], csr_matrix, dict]:
    """(doc ids, (docs, vocab) CSR at threshold 0, info) -- from the cache when present.

    info: {"docs_per_second", "encode_seconds", "device", "batch_size", "encoded_at", "cached"}; docs/s is the
    throughput measured when the vectors were encoded (summed over the shards, across resumed runs; a warm run has
    nothing to time, and reports the encoding run's, with that run's batch size and date). Every file
    is written atomically. Shards of `shard_docs` documents are saved under ``<key>.parts/`` as they finish, so an
    interrupted encoding resumes from its last finished shard; the complete cache entry replaces them. The
    cache key holds `model_fp` (`model_fingerprint` of the folder), or without it `weights_fingerprint` of the
    encoder's model, so a model changed in memory (between training steps, say) never gets another's vectors.
    """
    if isinstance(shard_docs, bool) or not isinstance(shard_docs, int) or shard_docs < 1:
        raise ValueError(f"shard_docs must be an int >= 1, got {shard_docs!r}")
    doc_ids = list(dataset.corpus)
    projection = dtype_name(encoder.projection_dtype) if encoder.projection_dtype else "model"
    model_dtype = dtype_name(getattr(encoder.model, "dtype", "float32"))
    path = parts = None
    if cache_dir:  # the key hashes the corpus and maybe every weight: only when a cache will use it
        key = "-".join(
            [
                model_fp or weights_fingerprint(encoder.model),  # never another model's vectors (was "unknown")
                corpus_fingerprint(dataset),
                f"L{encoder.max_lengths['document']}",
                projection,
                encoding_fingerprint(encoder),
            ]
            + ([] if shard_docs == CORPUS_SHARD_DOCS else [f"S{shard_docs}"])  # the default keeps older entries valid
            # the model's dtype: a folder loaded in bf16 (dtype=) has the float32 weights' fingerprint
            + ([] if model_dtype == "float32" else [model_dtype])
        )
        path = os.path.join(cache_dir, f"{key}.npz")
        parts = os.path.join(cache_dir, f"{key}.parts")  # finished shards of an unfinished run
    starts = range(0, max(len(doc_ids), 1), shard_docs)  # an empty corpus: one empty shard, a (0, vocab) matrix
    cached = _load_saved(path, len(doc_ids)) if path else None
    if cached is not None:
        shutil.rmtree(parts, ignore_errors=True)  # left by an interrupt between the entry's write and this cleanup
        return doc_ids, cached[0], {**cached[1], "cached": True}
    if path and os.path.isfile(path):
        warnings.warn(f"{path}: unreadable corpus cache entry; encoding the corpus again to replace it")
    if show_progress_bar is None:
        show_progress_bar = len(doc_ids) >= PROGRESS_BAR_MIN_TEXTS
    shards, seconds = [], 0.0
    # one shard: the encoder's own bar (per batch); several: one bar over the corpus, a shard at a time
    with tqdm(total=len(doc_ids), disable=not show_progress_bar or len(starts) < 2, desc="Encoding corpus",
              unit="doc") as bar:
        for number, begin in enumerate(starts):
            # a shard's texts at a time: the whole corpus as "title text" strings was a second copy of it
            shard_texts = [dataset.document_text(doc_id) for doc_id in doc_ids[begin : begin + shard_docs]]
            part = os.path.join(parts, f"{number:06d}.npz") if parts and len(starts) > 1 else None
            finished = _load_saved(part, len(shard_texts)) if part else None
            if finished is not None and finished[1].get("batch_size") != batch_size:
                finished = None  # saved at another --batch-size: its seconds would be labelled with this one
            if finished is None:
                start = time.perf_counter()
                shard = encoder.encode_batch(
                    shard_texts, batch_size=batch_size, kind="document", threshold=0.0, output="csr",
                    show_progress_bar=show_progress_bar and len(starts) == 1,
                )
                finished = shard, {"encode_seconds": time.perf_counter() - start, "batch_size": batch_size}
                if part:
                    _save_csr(part, *finished)
            shards.append(finished[0])
            seconds += finished[1]["encode_seconds"]
            bar.update(len(shard_texts))
    matrix = shards[0] if len(shards) == 1 else scipy.sparse.vstack(shards, format="csr")
    # docs/s belongs to how the vectors were encoded: a warm run reports that run's, with its batch size and date
    info = {"docs_per_second": len(doc_ids) / seconds if seconds else 0.0, "encode_seconds": seconds,
            "device": device_label(encoder.device), "batch_size": batch_size,
            "encoded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if path:
        _save_csr(path, matrix, info)
        shutil.rmtree(parts, ignore_errors=True)
    return doc_ids, matrix, {**info, "cached": False}


# ---- one dataset -----------------------------------------------------------------------------------------------
def query_latencies_ms(encoder, index: InvertedIndex, texts: Sequence[str], threshold: float) -> list[float]:
    """Single-query encode + top-10 search, one query at a time, in milliseconds: what a search service does per
    request -- `encode_to_ids` (the single-text path, not a batch of one) and a one-row index lookup."""
    def search(text):
        ids, weights = encoder.encode_to_ids(text, kind="query", threshold=threshold)
        vector = csr_matrix((np.asarray(weights, dtype=np.float32), np.asarray(ids, dtype=np.int64), [0, len(ids)]),
                            shape=(1, index.vocab_size))
        return index.search(vector, k=LATENCY_TOP_K)

    for text in texts[:5]:  # warm-up: first calls pay for allocation and kernel selection
        search(text)
    timings = []
    for text in texts:
        start = time.perf_counter()
        search(text)
        timings.append((time.perf_counter() - start) * 1000)
    return timings


def own_id_judgements(dataset: BEIRDataset) -> list[str]:
    """The queries whose qrels judge the document of their own id relevant (grade > 0). BEIR drops a query's own id
    from its hits (ArguAna, Quora: queries are documents there, never relevant to themselves); a dataset judging
    such pairs relevant has query and document ids that only share their spelling ("1", "2", ...), so eval keeps
    those hits there -- dropped, they could never count."""
    return [query_id for query_id, judged in dataset.qrels.items() if judged.get(query_id, 0) > 0]


def evaluate_dataset(
    encoder,
    dataset: BEIRDataset,
    threshold: float,
    model_fp: Optional[str] = None,
    cache_dir: Optional[str] = DEFAULT_CACHE_DIR,
    bm25: bool = True,
    production: bool = True,
    index_path: Optional[str] = None,
    batch_size: int = 32,
    latency_queries: int = LATENCY_QUERIES,
    show_progress_bar: Optional[bool] = None,
) -> tuple[dict, dict, dict]:
    """(results entry in the shared format, run {qid: {doc_id: score}}, artifacts {index, doc_matrix,
    query_matrix, query_ids, encode_info}) for one dataset (encode_info: `encode_corpus`'s)."""
    if production and not (isinstance(latency_queries, int) and latency_queries >= 1):
        raise ValueError(f"latency_queries must be an int >= 1 (or production=False), got {latency_queries!r}")
    query_ids = list(dataset.qrels)  # every judged query counts, hits or not
    doc_ids, raw_docs, encode_info = encode_corpus(
        encoder, dataset, cache_dir, model_fp, batch_size=batch_size, show_progress_bar=show_progress_bar
    )
    doc_matrix = apply_threshold(raw_docs, threshold)
    del raw_docs  # the corpus at threshold 0: one copy fewer held through search (the cache keeps it on disk)
    query_matrix = encoder.encode_batch(
        [dataset.queries[qid] for qid in query_ids], batch_size=batch_size, kind="query", threshold=threshold,
        show_progress_bar=show_progress_bar, output="csr",
    )
    index = InvertedIndex(doc_matrix, doc_ids)
    own_ids_judged = own_id_judgements(dataset)
    if own_ids_judged:
        warnings.warn(f"{dataset.name}: {len(own_ids_judged)} relevant judgement(s) pair a query with the document of "
                      f"its own id (e.g. {own_ids_judged[0]!r}): its query and document ids are not one namespace, so "
                      "no hit is dropped as the query's own document (BEIR's convention elsewhere)", stacklevel=2)
    drop_self = not own_ids_judged
    # judged only as non-relevant (grade 0): every metric 0 whatever the ranking (BEIR and pytrec_eval count them)
    without_relevant = [query_id for query_id, judged in dataset.qrels.items()
                        if not any(grade > 0 for grade in judged.values())]
    if without_relevant:
        warnings.warn(f"{dataset.name}: {len(without_relevant)} of {len(query_ids)} judged queries have no relevant "
                      f"document (grade > 0; first: {without_relevant[0]!r}): they score 0 on every metric",
                      stacklevel=2)
    run = rounded_run(index.to_run(query_ids, index.search(query_matrix, k=TOP_K + 1), k=TOP_K, drop_self=drop_self))
    entry = {
        "split": dataset.split,
        "num_queries": len(query_ids),
        "num_docs": len(doc_ids),
        "data_fingerprint": dataset.fingerprint,
        "data_source": dataset.hub_id or LOCAL_FOLDER,  # the card names a Hub dataset, and only a Hub dataset, as one
        # judged documents the corpus lacks: in every recall denominator, never retrievable (BEIR's convention)
        **({"judged_documents_missing": len(dataset.missing_documents)} if dataset.missing_documents else {}),
        # relevant own-id judgements: own-id hits kept, in FLES-1's run and BM25's (`own_id_judgements`)
        **({"own_id_judgements": len(own_ids_judged)} if own_ids_judged else {}),
        **({"queries_without_relevant": len(without_relevant)} if without_relevant else {}),
        "metrics": {
            **evaluate_run(dataset.qrels, run),
            "nnz_doc": average_nnz(doc_matrix),
            "nnz_query": average_nnz(query_matrix),
        },
        "bm25": None,
        "production": None,
    }
    if bm25:
        from fles1.bm25 import bm25_library, bm25_run

        bm25_metrics = evaluate_run(dataset.qrels, bm25_run(dataset, query_ids, drop_self=drop_self))
        entry["bm25"] = {"library": bm25_library(), "metrics": bm25_metrics}
    index_bytes = index.save(index_path) if index_path else None  # asked for: saved with or without production
    if production:
        if index_bytes is None:
            with scratch_directory("fles1-index-size") as scratch:
                index_bytes = index.save(os.path.join(scratch, "index.npz"))
        sample = [dataset.queries[qid] for qid in query_ids[:latency_queries]]
        timings = query_latencies_ms(encoder, index, sample, threshold)
        entry["production"] = {
            "docs_per_second": encode_info["docs_per_second"],
            # where docs/s comes from: this run's encoding, or (cached) the run that filled the cache entry
            "docs_per_second_from_cache": encode_info["cached"],
            "docs_per_second_batch_size": encode_info.get("batch_size"),  # None: an entry written before it was kept
            # a cached entry's device and date (the run that encoded the corpus), not this run's
            "docs_per_second_device": encode_info.get("device"),
            "docs_per_second_encoded_at": encode_info.get("encoded_at"),
            "query_latency_ms_p50": float(np.percentile(timings, 50)),
            "query_latency_ms_p95": float(np.percentile(timings, 95)),
            "query_latency_queries": len(timings),  # --latency-queries, or every query of a smaller set
            "index_bytes_per_1k_docs": index_bytes / len(doc_ids) * 1000,
            "index_ratio_to_dense_768": index_bytes / (len(doc_ids) * DENSE_768_BYTES_PER_DOC),
        }
    artifacts = {"index": index, "doc_matrix": doc_matrix, "query_matrix": query_matrix, "query_ids": query_ids,
                 "encode_info": encode_info, "drop_self": drop_self}
    return entry, run, artifacts


# ---- several datasets ------------------------------------------------------------------------------------------
def run_file_paths(run_file: str, names: Sequence[str]) -> dict[str, str]:
    """One dataset: run_file itself; several: ``run.<name>.trec`` beside it."""
    if len(names) == 1:
        return {names[0]: run_file}
    stem, extension = os.path.splitext(run_file)
    return {name: f"{stem}.{name}{extension or '.trec'}" for name in names}


def numbered_apart(bases: Sequence[str], max_bytes: Optional[int] = None) -> list[str]:
    """`bases` made distinct: a repeated one numbered "-2", "-3", ... past any name another base is (nf, nf, nf-2
    -> nf, nf-3, nf-2), cut to keep within `max_bytes` of UTF-8 with its number."""
    taken, names = set(bases), []
    for base in bases:
        name, number = base, 1
        while name in names or (name != base and name in taken):
            number += 1
            suffix = f"-{number}"
            stem = base if max_bytes is None else \
                base.encode("utf-8")[:max_bytes - len(suffix)].decode("utf-8", "ignore")
            name = stem + suffix
        names.append(name)
    return names


def dataset_names(datasets: Sequence[BEIRDataset]) -> list[str]:
    """One name per dataset (results, run files and exports are keyed by it): its folder name, numbered apart
    (`numbered_apart`) when several share one."""
    return numbered_apart([dataset.name for dataset in datasets])


def _as_str(path):
    return os.fspath(path) if isinstance(path, os.PathLike) else path


def evaluate(
    model: str,
    data: Sequence[str],
    split: str = "test",
    threshold: Optional[float] = None,
    cache_dir: Optional[str] = DEFAULT_CACHE_DIR,
    bm25: bool = True,
    production: bool = True,
    run_file: Optional[str] = None,
    index_dir: Optional[str] = None,
    export_dir: Optional[str] = None,
    batch_size: int = 32,
    device: Optional[str] = None,
    latency_queries: int = LATENCY_QUERIES,
    show_progress_bar: Optional[bool] = None,
    keep_missing_documents: bool = False,
    log=print,
    written_after: Optional[dict[str, str]] = None,
) -> dict:
    """Evaluate a FLES-1 folder/hub id on BEIR datasets; returns the results dict (shared format).

    All datasets are loaded (and validated), and every output location checked, before any encoding, so bad data
    or a path that cannot be written fails fast. Run files, indices and exports are written atomically; nothing
    claims completeness before the results dict is returned. ``written_after``: files the caller writes from the
    results (``{"--output": path}``); a run file or index that would be one of them is refused before the encoding.
    """
    from fles1_encoder import FLES1Encoder

    if isinstance(data, (str, bytes, os.PathLike)):  # each character was taken for a dataset ("." the cwd)
        raise TypeError(f"data must be a list of BEIR folders or hub ids, got one {type(data).__name__}: "
                        f"evaluate(model, [{str(data)!r}])")
    # pathlib.Path works as a str does (one in the results dict was a TypeError when it was written, after the work)
    model, data = _as_str(model), [_as_str(source) for source in data]
    cache_dir, run_file, index_dir, export_dir = map(_as_str, (cache_dir, run_file, index_dir, export_dir))
    for option, path, folder in (("cache_dir", cache_dir, True), ("run_file", run_file, False),
                                 ("index_dir", index_dir, True), ("export_dir", export_dir, True)):
        if path:  # a typo here should not cost the corpus encoding
            require_writable(path, option, folder=folder)
    datasets = [load_beir(source, split, keep_missing_documents) for source in data]
    names = dataset_names(datasets)
    run_paths = run_file_paths(run_file, names) if run_file else {}
    _refuse_shared_outputs({**{f"run file of {name}": path for name, path in run_paths.items()},
                            **{f"index of {name}": _index_path(index_dir, name) for name in names if index_dir},
                            **(written_after or {}), **({"cache_dir": cache_dir} if cache_dir else {})},
                           {f"{engine} export of {name}": os.path.join(export_dir, name, engine)
                            for name in names for engine in EXPORT_ENGINES} if export_dir else {})
    for dataset in datasets:  # ids the requested outputs cannot carry fail now, not after the encoding
        if run_file or export_dir:  # the export too: Anserini writes TREC runs, reads whitespace-separated topics
            remedy = "leave out the run file" if run_file else "leave out --export"
            check_trec_ids(dataset.qrels, f"{dataset.name}: query", remedy=remedy)
            check_trec_ids(dataset.corpus, f"{dataset.name}: corpus", remedy=remedy)
        if export_dir:
            check_elasticsearch_ids(dataset.corpus, dataset.name)
    encoder = FLES1Encoder.from_pretrained(model, device=device)
    threshold = encoder.threshold if threshold is None else float(threshold)
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    model_fp = model_fingerprint(model)
    results = {
        # the weights' and config's hash, and the tokenizer's (the same weights tokenizing otherwise score otherwise)
        "model": {"path": model, "fingerprint": model_fp, "tokenizer_fingerprint": tokenizer_fingerprint(encoder.tokenizer)},
        "threshold": threshold,
        "query_max_length": encoder.max_lengths["query"],
        "document_max_length": encoder.max_lengths["document"],
        "environment": environment(encoder),
        "datasets": {},
    }
    index_names = elasticsearch_index_names(names)
    if export_dir:
        vocab = encoder.vocabulary()  # wordless rows of a padded vocabulary named, not None
        export_settings = {"model": model, "model_fingerprint": model_fp, "split": split,
                           **{key: results[key] for key in ("threshold", "query_max_length", "document_max_length")}}
    for name, dataset in zip(names, datasets):
        log(f"[{name}] {len(dataset.corpus)} docs, {len(dataset.qrels)} {split} queries, threshold {threshold}")
        start = time.perf_counter()
        entry, run, artifacts = evaluate_dataset(
            encoder, dataset, threshold, model_fp=model_fp, cache_dir=cache_dir, bm25=bm25, production=production,
            index_path=_index_path(index_dir, name) if index_dir else None,
            batch_size=batch_size, latency_queries=latency_queries, show_progress_bar=show_progress_bar,
        )
        if name in run_paths:
            write_trec_run(run, run_paths[name], tag=f"fles1-t{threshold:g}")
        if export_dir:
            _export_dataset(os.path.join(export_dir, name), index_names[name], artifacts, vocab, export_settings)
        results["datasets"][name] = entry
        cached = "cached" if artifacts["encode_info"]["cached"] else "encoded"
        log(f"[{name}] NDCG@10 {entry['metrics']['ndcg@10']:.4f} ({cached} corpus, {time.perf_counter() - start:.1f}s)")
        del run, artifacts  # the index and vectors of one dataset at a time
    return results


def _index_path(index_dir: str, name: str) -> str:
    return os.path.join(index_dir, f"{name}.index.npz")


def _refuse_shared_outputs(outputs: dict[str, str], replaced: dict[str, str]) -> None:
    """ValueError where two outputs (what -> path) are one file, or one lies in a folder an export replaces whole
    (what -> folder): one would be written over the other (with several datasets, run files are named per dataset,
    so the CLI's check of the flags' own paths could not see it; a run file in DIR/toy/pyserini went with the
    export's swap)."""
    seen: dict[str, str] = {}
    for what, path in outputs.items():
        if not path:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(f"{what} {path} is the file the {seen[real]} is written to; give each output its own path")
        seen[real] = what
        for whole, folder in replaced.items():
            if path_within(path, folder):
                raise ValueError(f"{what} {path} lies in {folder}, which the {whole} replaces whole; give it a path "
                                 "outside it")
            if path_within(folder, path):  # DIR/<dataset> itself, or a folder above it
                raise ValueError(f"{what} {path} would hold {folder}, which the {whole} writes; give it a path "
                                 "outside the export")


def elasticsearch_index_names(names: Sequence[str]) -> dict[str, str]:
    """Each dataset name's Elasticsearch index: `exports.elasticsearch_index_name`, numbered apart where two names
    clean to one index ("nf corpus" and "nf-corpus", "Tiny" and "tiny"), whose documents would otherwise mix in it
    and overwrite each other's ids; within the 255 bytes an index name may have."""
    return dict(zip(names, numbered_apart([exports.elasticsearch_index_name(name) for name in names], max_bytes=255)))


EXPORT_ENGINES = ("elasticsearch", "pyserini")  # the folders an export writes per dataset, each replaced whole


def _export_dataset(folder: str, index_name: str, artifacts: dict, vocab, settings: dict) -> None:
    """folder/elasticsearch/ and folder/pyserini/: documents, the split's queries (thresholded as eval's) and an
    ``export.json`` saying what they were made with and how to run them (`exports.ELASTICSEARCH_COMMANDS`, the
    ANSERINI_* commands). Both are written beside them before either replaces an earlier export (never one engine's
    files at one threshold and the other's at another); anything else in the folder (a run file, say) stays."""
    doc_ids, doc_matrix = artifacts["index"].doc_ids, artifacts["doc_matrix"]
    query_ids, query_matrix = artifacts["query_ids"], artifacts["query_matrix"]
    manifest = {**settings, "documents": len(doc_ids), "queries": len(query_ids), "top_k": TOP_K}
    # both written in their staging folders before either replaces its earlier export (two renames apart)
    with atomic_directory(os.path.join(folder, EXPORT_ENGINES[0]), replace=True) as elasticsearch, \
            atomic_directory(os.path.join(folder, EXPORT_ENGINES[1]), replace=True) as pyserini:
        paths = exports.write_elasticsearch(elasticsearch, index_name, doc_ids, doc_matrix, vocab)
        exports.write_elasticsearch_queries(os.path.join(elasticsearch, "queries.jsonl"), query_ids, query_matrix,
                                            vocab, size=TOP_K, exclude_own_id=artifacts["drop_self"])
        atomic_write_json(os.path.join(elasticsearch, "export.json"), {**manifest, "elasticsearch": {
            "index": index_name, "field": exports.RANK_FEATURES_FIELD,
            "bulk_files": [os.path.basename(path) for path in paths["bulk"]],
            "feature_names": "vocabulary tokens with '%' -> '%25' and '.' -> '%2E' (fles1.exports.feature_name)",
            "precision": f"weights written to {exports.ES_WEIGHT_DIGITS} significant digits; rank_features keeps "
                         "9 significant bits: document weights within 2^-8 relative",
            "run_from": exports.ANSERINI_RUN_FROM, **exports.elasticsearch_commands(index_name)}})
        os.makedirs(os.path.join(pyserini, "collection"))
        exports.write_pyserini(os.path.join(pyserini, "collection", "docs.jsonl"), doc_ids, doc_matrix, vocab)
        exports.write_anserini_queries(os.path.join(pyserini, "queries.tsv"), query_ids, query_matrix, vocab)
        atomic_write_json(os.path.join(pyserini, "export.json"), {**manifest, "pyserini": {
            "impact_scale": exports.IMPACT_SCALE, "run_from": exports.ANSERINI_RUN_FROM,
            "index_command": exports.ANSERINI_INDEX_COMMAND,
            "search_command": exports.ANSERINI_SEARCH_COMMAND if artifacts["drop_self"]
            else exports.ANSERINI_SEARCH_COMMAND_KEEPING_OWN_IDS,
            # no impact >= 1: left out of queries.tsv (Anserini cannot read such a line; eval scores an empty query
            # 0, but a query of weights all under 0.005 still matches there), and documents Anserini skips as empty
            "empty_impact_queries": exports.empty_impact_rows(query_ids, query_matrix),
            "empty_impact_documents": exports.empty_impact_rows(doc_ids, doc_matrix)}})


def write_results(results: dict, path: str) -> None:
    atomic_write_json(path, results)


# ---- Markdown for the model card -------------------------------------------------------------------------------
def _fmt(value, digits=4):
    return MISSING if value is None else f"{value:.{digits}f}"


def markdown_tables(results: dict) -> str:
    """Retrieval table (one row per dataset, plus an average row when several: the zero-shot table) and the
    production table, as Markdown."""
    datasets = results["datasets"]
    threshold = results["threshold"]
    bm25_ran = any(entry.get("bm25") for entry in datasets.values())  # --no-bm25: its column is all "—"
    lines = [
        f"Retrieval ({next(iter(datasets.values()))['split'] if datasets else 'test'} split, threshold {threshold:g}, "
        f"doc max length {results['document_max_length']}, top-{TOP_K} exact dot product; "
        f"BM25: {'bm25s' if bm25_ran else 'not run'})",
        "",
        "| " + " | ".join(["Dataset", *(IR_METRICS[key] for key in METRIC_KEYS), *SPARSITY_METRICS.values(),
                            "BM25 NDCG@10"]) + " |",
        "|---" * (len(METRIC_KEYS) + len(SPARSITY_METRICS) + 2) + "|",
    ]
    rows = []
    for name, entry in datasets.items():
        metrics = entry["metrics"]
        bm25 = entry["bm25"]["metrics"]["ndcg@10"] if entry.get("bm25") else None
        rows.append([metrics[key] for key in METRIC_KEYS] + [metrics["nnz_doc"], metrics["nnz_query"], bm25])
        lines.append(f"| {markdown_text(name)} | " + " | ".join(_row(rows[-1])) + " |")
    if len(rows) > 1:
        average = [
            None if any(row[i] is None for row in rows) else statistics.fmean(row[i] for row in rows)
            for i in range(len(rows[0]))
        ]
        lines.append("| **Average** | " + " | ".join(_row(average)) + " |")
    production = {name: entry["production"] for name, entry in datasets.items() if entry.get("production")}
    if production:
        lines += [
            "",
            f"Production ({results['environment']['device']}; latency = encode one query + top-{LATENCY_TOP_K} "
            "search; index = compressed npz on disk, float16 weights; docs/s as measured when the corpus was "
            "encoded, * = by an earlier run, from the cache)",
            "",
            "| Dataset | Docs/s (encode) | Query p50 (ms) | Query p95 (ms) | Index MB / 1k docs | vs dense 768-d |",
            "|---|---|---|---|---|---|",
        ]
        for name, values in production.items():
            lines.append(
                f"| {markdown_text(name)} | {values['docs_per_second']:.1f}{'*' * bool(values.get('docs_per_second_from_cache'))} | "
                f"{values['query_latency_ms_p50']:.2f} | "
                f"{values['query_latency_ms_p95']:.2f} | {values['index_bytes_per_1k_docs'] / 1e6:.3f} | "
                f"{values['index_ratio_to_dense_768']:.3f}× |"
            )
    return "\n".join(lines) + "\n"


def _row(values):
    return [_fmt(v, 1) if i in (5, 6) else _fmt(v) for i, v in enumerate(values)]


def write_markdown(results: dict, path: str) -> None:
    with atomic_open(path) as handle:
        handle.write(markdown_tables(results))


__all__ = ["evaluate", "evaluate_dataset", "encode_corpus", "markdown_tables", "write_results", "model_fingerprint"]
