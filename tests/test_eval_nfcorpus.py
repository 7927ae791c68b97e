"""The real check: the shipped backbone as a FLES-1 folder on nfcorpus test, threshold 0, document max length 256
(NDCG@10 0.3058 with graded qrels; sentence-transformers' SparseInformationRetrievalEvaluator on the same vectors
gives 0.3059 with binary relevance and its own tie order, ../shared/README.md), reproduced independently from the
written TREC run file.

One module-scoped evaluation serves every test here (the Pyserini impact check included). Its corpus encoding goes to
a cache of its own, cold on every run (~1-2 minutes on 2 cores): a warm ~/.cache left by an earlier run would let a
regression in the document path pass here and fail on a fresh machine.
"""

import csv
import os

import numpy as np
import pytest
import pytrec_eval

from fles1.beir import load_beir
from fles1.exports import impact_error_bound, quantize
from fles1.evaluation import evaluate_dataset, model_fingerprint
from fles1.metrics import write_trec_run
from fles1.retrieval import apply_threshold

SENTENCE_TRANSFORMERS_NDCG10 = 0.3059  # see the docstring: not the same metric conventions, within 0.003 here


@pytest.fixture(scope="module")
def nfcorpus_eval(fles1_checkpoint, nfcorpus_dir, tmp_path_factory):
    from fles1_encoder import FLES1Encoder

    encoder = FLES1Encoder.from_pretrained(fles1_checkpoint, device="cpu")
    assert encoder.max_lengths["document"] == 256
    dataset = load_beir(nfcorpus_dir, "test")
    entry, run, artifacts = evaluate_dataset(
        encoder, dataset, threshold=0.0, model_fp=model_fingerprint(fles1_checkpoint),
        cache_dir=str(tmp_path_factory.mktemp("corpus-cache")),
        latency_queries=20, show_progress_bar=False,
    )
    run_file = str(tmp_path_factory.mktemp("nfcorpus-run") / "run.trec")
    write_trec_run(run, run_file)
    return {"encoder": encoder, "dataset": dataset, "entry": entry, "run_file": run_file, **artifacts}


def test_nfcorpus_threshold0_matches_sentence_transformers(nfcorpus_eval):
    entry = nfcorpus_eval["entry"]
    assert entry["num_queries"] == 323 and entry["num_docs"] == 3633
    assert entry["metrics"]["ndcg@10"] == pytest.approx(SENTENCE_TRANSFORMERS_NDCG10, abs=0.003)
    assert entry["metrics"]["nnz_doc"] == pytest.approx(251.7, abs=2) and 10 < entry["metrics"]["nnz_query"] < 25
    # the shipped BM25 (Lucene scoring, k1 1.5, b 0.75, stemmed): 0.3210; k1 0.9 / b 0.4 give 0.3177
    assert entry["bm25"]["metrics"]["ndcg@10"] == pytest.approx(0.3210, abs=5e-4)
    production = entry["production"]
    assert production["docs_per_second"] > 0 and production["query_latency_ms_p95"] >= production["query_latency_ms_p50"]
    assert 0 < production["index_ratio_to_dense_768"] < 1


def read_test_qrels(nfcorpus_dir, binary=False) -> dict:
    """qrels/test.tsv read with csv, independently of fles1.beir; ``binary``: grades 1 and 2 alike."""
    qrels = {}
    with open(os.path.join(nfcorpus_dir, "qrels", "test.tsv"), newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            grade = int(row["score"])
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = min(grade, 1) if binary else grade
    return qrels


def read_run(path) -> dict:
    """A TREC run file read by splitting lines, independently of fles1.metrics."""
    run = {}
    with open(path) as handle:
        for line in handle:
            qid, _, did, _, score, _ = line.split()
            run.setdefault(qid, {})[did] = float(score)
    return run


def test_run_file_reproduces_metrics_with_independent_pytrec_eval(nfcorpus_eval, nfcorpus_dir):
    qrels, run = read_test_qrels(nfcorpus_dir), read_run(nfcorpus_eval["run_file"])
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    metrics = nfcorpus_eval["entry"]["metrics"]
    for ours, theirs in (("ndcg@10", "ndcg_cut_10"), ("recall@100", "recall_100")):
        independent = sum(per_query.get(qid, {}).get(theirs, 0.0) for qid in qrels) / len(qrels)
        assert round(independent, 4) == round(metrics[ours], 4)


def test_binary_relevance_explains_most_of_the_gap_to_sentence_transformers(nfcorpus_eval, nfcorpus_dir):
    """README: sentence-transformers' evaluator scores binary relevance (grades 1 and 2 alike); our run scored that
    way gives NDCG@10 0.3046 (graded: 0.3058)."""
    qrels = read_test_qrels(nfcorpus_dir, binary=True)
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(read_run(nfcorpus_eval["run_file"]))
    binary = sum(per_query.get(qid, {}).get("ndcg_cut_10", 0.0) for qid in qrels) / len(qrels)
    assert round(binary, 4) == 0.3046 and round(nfcorpus_eval["entry"]["metrics"]["ndcg@10"], 4) == 0.3058


def test_pyserini_impacts_keep_top10_beyond_ties(nfcorpus_eval):
    """Integer impacts round(100 w) on both sides (threshold 0.3): a pair of top-10 documents may only change
    order when their exact scores are within the rounding bound of each other (ties at impact resolution)."""
    encoder, dataset, query_ids = nfcorpus_eval["encoder"], nfcorpus_eval["dataset"], nfcorpus_eval["query_ids"]
    docs = apply_threshold(nfcorpus_eval["doc_matrix"], 0.3)
    queries = encoder.encode_batch([dataset.queries[q] for q in query_ids], kind="query", threshold=0.3,
                                   output="csr", show_progress_bar=False)
    exact = (queries @ docs.T).toarray()
    quantized = (quantize(queries).astype("int64") @ quantize(docs).astype("int64").T).toarray()
    bound = impact_error_bound(queries, docs)
    assert abs(quantized / 100**2 - exact).max() <= bound.max()
    changed = 0
    for row in range(len(query_ids)):
        top_exact = np.lexsort((np.arange(exact.shape[1]), -exact[row]))[:10]
        top_quantized = np.lexsort((np.arange(exact.shape[1]), -quantized[row]))[:10]
        changed += not np.array_equal(top_exact, top_quantized)
        candidates = np.union1d(top_exact, top_quantized)
        for a in candidates:
            for b in candidates:
                if exact[row, a] > exact[row, b] and quantized[row, a] < quantized[row, b]:  # an inversion
                    assert exact[row, a] - exact[row, b] <= bound[row, a] + bound[row, b]
    assert changed < len(query_ids) // 2  # the scale is fine enough that most rankings are untouched
