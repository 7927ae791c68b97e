"""Engine exports: Elasticsearch/OpenSearch rank_features (field-name rules) and Pyserini JsonVectorCollection."""

import json

import numpy as np
import pytest
from scipy.sparse import csr_matrix, random as sparse_random

from fles1.exports import (
    elasticsearch_mapping, elasticsearch_query, feature_name, impact_error_bound, quantize, token_from_feature_name,
    write_elasticsearch, write_pyserini,
)

VOCAB = ["[PAD]", ".", "u.s", "%", "%2E", "machine", "##ing", "...", "café"]


def test_feature_names_follow_engine_rules_and_round_trip():
    names = [feature_name(token) for token in VOCAB]
    assert all(name and "." not in name for name in names)
    assert len(set(names)) == len(names)  # '%' is escaped too, so '.' and '%2E' cannot collide
    assert [token_from_feature_name(name) for name in names] == VOCAB
    with pytest.raises(ValueError, match="non-empty"):
        feature_name("")


def test_elasticsearch_bulk_and_mapping(tmp_path):
    matrix = csr_matrix(np.array([[0, 1.5, 0.25, 0, 0, 2.0, 0, 0, 0], [0] * 9, [0, 0, 0, 1e-9, 0.5, 0, 0, 0.75, 1.0]],
                                 dtype=np.float32))
    paths = write_elasticsearch(str(tmp_path), "NFCorpus Tiny", ["a", "b", "c"], matrix, VOCAB)
    assert json.load(open(paths["mapping"])) == elasticsearch_mapping()
    assert elasticsearch_mapping()["mappings"]["properties"]["tokens"] == {"type": "rank_features"}
    lines = [json.loads(line) for line in open(paths["bulk"], encoding="utf-8")]
    assert [line["index"]["_id"] for line in lines[::2]] == ["a", "b", "c"]
    # Elasticsearch refuses uppercase and spaces in index names: the dataset folder's name is made one it takes
    assert {line["index"]["_index"] for line in lines[::2]} == {"nfcorpus-tiny"}
    assert lines[1]["tokens"] == {"%2E": 1.5, "u%2Es": 0.25, "machine": 2.0}
    assert lines[3]["tokens"] == {}  # an empty vector is still a document
    assert lines[5]["tokens"] == {"%252E": 0.5, "%2E%2E%2E": 0.75, "café": 1.0}  # 1e-9 rounds to 0: dropped
    clauses = elasticsearch_query({"u.s": 0.5, "machine": 1.0})["query"]["bool"]["should"]
    assert clauses[0]["rank_feature"] == {"field": "tokens.u%2Es", "linear": {}, "boost": 0.5}


def test_pyserini_json_vector_collection_integer_impacts(tmp_path):
    docs = sparse_random(50, len(VOCAB), density=0.5, format="csr", dtype=np.float32, random_state=0) * 3
    path = write_pyserini(str(tmp_path / "docs.jsonl"), [f"d{i}" for i in range(50)], docs, VOCAB)
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    impacts = quantize(docs)
    for row, doc in enumerate(rows):
        assert set(doc) == {"id", "contents", "vector"} and doc["id"] == f"d{row}"
        assert all(isinstance(v, int) and v > 0 for v in doc["vector"].values())
        assert sum(doc["vector"].values()) == impacts[row].sum()
        for token, value in doc["vector"].items():
            assert abs(value - 100 * docs[row, VOCAB.index(token)]) <= 0.5


def test_impact_error_bound_holds():
    docs = sparse_random(400, 300, density=0.05, format="csr", dtype=np.float32, random_state=1) * 2.5
    queries = sparse_random(30, 300, density=0.05, format="csr", dtype=np.float32, random_state=2) * 2.5
    for scale in (10, 100):
        exact = (queries @ docs.T).toarray()
        quantized = (quantize(queries, scale).astype(np.int64) @ quantize(docs, scale).astype(np.int64).T).toarray()
        error = np.abs(quantized / scale**2 - exact)
        bound = impact_error_bound(queries, docs, scale)
        assert np.all(error <= bound + 1e-9)
        assert error.max() > bound.max() / 20  # the bound is not vacuous
    with pytest.raises(ValueError, match="scale"):
        quantize(docs, 0)


def test_an_interrupted_reexport_leaves_the_earlier_export_whole(tiny_random_checkpoint, tmp_path, monkeypatch):
    """Each file was replaced on its own: interrupted after the Elasticsearch files, the folder held those at the
    new threshold beside Pyserini's at the old one."""
    import fles1.exports
    from fles1.evaluation import evaluate
    from test_eval import write_beir

    data, export = write_beir(tmp_path / "toy"), tmp_path / "export"
    evaluate(tiny_random_checkpoint, [data], threshold=0.0, export_dir=str(export), cache_dir=None, bm25=False,
             production=False)
    before = {path: path.read_bytes() for path in export.rglob("*") if path.is_file()}
    assert len(before) == 3

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fles1.exports, "write_pyserini", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_random_checkpoint, [data], threshold=1.0, export_dir=str(export), cache_dir=None, bm25=False,
                 production=False)
    assert {path: path.read_bytes() for path in export.rglob("*") if path.is_file()} == before
    assert sorted(path.name for path in (export / "toy").iterdir()) == ["elasticsearch", "pyserini"]  # no staging


def test_an_export_keeps_what_else_its_dataset_folder_holds(tiny_random_checkpoint, tmp_path):
    """Replacing the dataset's export folder as a whole deleted the run file the same run had written into it."""
    from fles1.evaluation import evaluate
    from test_eval import write_beir

    data, export = write_beir(tmp_path / "toy"), tmp_path / "export"
    for threshold in (0.0, 1.0):  # a first export, then a replacing one
        evaluate(tiny_random_checkpoint, [data], threshold=threshold, export_dir=str(export), cache_dir=None,
                 bm25=False, production=False, run_file=str(export / "toy" / "run.trec"))
        assert sorted(path.name for path in (export / "toy").iterdir()) == ["elasticsearch", "pyserini", "run.trec"]
    assert all(weight >= 1.0 for line in (export / "toy" / "elasticsearch" / "bulk.ndjson").read_text().splitlines()[1::2]
               for weight in json.loads(line)["tokens"].values())
