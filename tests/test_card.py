"""Model card generation: every number comes from a result file, metadata parses with huggingface_hub."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from huggingface_hub import ModelCard

from fles1.card import MISSING, CardInputError, build_card

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_eval(path, model_path="outputs/seed1", fingerprint="fp-seed1", datasets=None, bm25=True, production=True):
    """A synthetic eval JSON in the shared format (values chosen so no two coincide)."""
    datasets = datasets or {"nfcorpus": 0.31234567}
    payload = {
        "model": {"path": model_path, "fingerprint": fingerprint},
        "threshold": 0.3, "query_max_length": 64, "document_max_length": 256,
        "environment": {"packages": {"torch": "2.13.0", "pytrec_eval": "0.5"}, "device": "cpu", "python": "3.11.9"},
        "datasets": {},
    }
    for index, (name, ndcg) in enumerate(datasets.items()):
        payload["datasets"][name] = {
            "split": "test", "num_queries": 323 + index, "num_docs": 3633 + index, "data_fingerprint": f"data-{name}",
            "metrics": {"ndcg@10": ndcg, "mrr@10": ndcg + 0.2011, "recall@100": ndcg - 0.0412,
                        "map@100": ndcg - 0.1723, "recall@1000": ndcg + 0.3377, "nnz_doc": 187.25 + index,
                        "nnz_query": 14.75 + index},
            "bm25": {"library": "bm25s", "metrics": {"ndcg@10": 0.31771, "mrr@10": 0.51234, "recall@100": 0.24561,
                                                     "map@100": 0.14321, "recall@1000": 0.57654}} if bm25 else None,
            "production": {"docs_per_second": 123.4, "query_latency_ms_p50": 0.87, "query_latency_ms_p95": 1.93,
                           "index_bytes_per_1k_docs": 312345, "index_ratio_to_dense_768": 0.1017}
            if production else None,
        }
    with open(path, "w") as handle:
        json.dump(payload, handle)
    return str(path)


def make_training_log(path, seed=1, crashes=(0, 2, 1, 0)):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    total = sum(crashes)
    payload = {
        "recipe": {"model_name_or_path": "bert-base-uncased", "learning_rate": 2e-5, "per_device_train_batch_size": 32,
                   "num_train_epochs": 2, "temperature": 0.05, "lambda_d": 3e-5,
                   "clfr": {"target_nnz_d": 400, "gain": 0.1, "interval_steps": 6250}},
        "seed": seed, "global_step": 12500, "train_runtime_s": 2589.5,
        "history": [{"step": 10, "epoch": 0.1, "loss": 2.5, "loss_contrastive": 2.4, "loss_reg_d": 0.1,
                     "loss_reg_q": 0.0, "loss_anticollapse": 0.0, "lambda_d": 3e-5, "lambda_q": 0.0,
                     "nnz_doc": 612.5, "nnz_query": 40.5, "eff_reg": 3e-4},
                    {"step": 12500, "epoch": 2.0, "loss": 0.4321, "loss_contrastive": 0.41, "loss_reg_d": 0.02,
                     "loss_reg_q": 0.0, "loss_anticollapse": 0.0012, "lambda_d": 4.1e-5, "lambda_q": 0.0,
                     "nnz_doc": 402.5, "nnz_query": 31.5, "eff_reg": 0.45}],
        "clfr": [{"step": 6250, "measured_nnz": 480.0, "target_nnz": 400, "lambda_d_before": 3e-5,
                  "lambda_d_after": 3.6e-5},
                 {"step": 12500, "measured_nnz": 402.5, "target_nnz": 400, "lambda_d_before": 3.6e-5,
                  "lambda_d_after": 3.61e-5}],
        "crashes": dict(zip(("non_finite_loss", "non_finite_grad", "loss_spike", "nnz_collapse"), crashes),
                        total=total),
    }
    with open(path, "w") as handle:
        json.dump(payload, handle)
    return str(path)
