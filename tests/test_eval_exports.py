"""Engine exports: Elasticsearch/OpenSearch rank_features (field-name rules) and Pyserini JsonVectorCollection."""

import collections
import json
import os

import numpy as np
import pytest
from scipy.sparse import csr_matrix, random as sparse_random

from fles1.exports import (
    elasticsearch_mapping, elasticsearch_query, feature_name, impact_error_bound, quantize, token_from_feature_name,
    write_anserini_queries, write_elasticsearch, write_elasticsearch_queries, write_pyserini,
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
    assert paths["bulk"] == [str(tmp_path / "bulk-00001.ndjson")]
    lines = [json.loads(line) for line in open(paths["bulk"][0], encoding="utf-8")]
    assert [line["index"]["_id"] for line in lines[::2]] == ["a", "b", "c"]
    # Elasticsearch refuses uppercase and spaces in index names: the dataset folder's name is made one it takes
    assert {line["index"]["_index"] for line in lines[::2]} == {"nfcorpus-tiny"}
    assert lines[1]["tokens"] == {"%2E": 1.5, "u%2Es": 0.25, "machine": 2.0}
    assert lines[3]["tokens"] == {}  # an empty vector is still a document
    # significant digits, not decimals: 6 decimals rounded 1e-9 to 0 (dropped) and 1.7e-6 to 2e-06 (+17%)
    assert lines[5]["tokens"] == {"%25": 1e-9, "%252E": 0.5, "%2E%2E%2E": 0.75, "café": 1.0}
    # a float32 subnormal (a threshold-0 export) would make Lucene refuse the whole document: positive normal only
    small = csr_matrix(np.array([[1.7e-6, 0.3, 1234.5678, 1e-40, 1e-45, 0, 0, 0, 0]], dtype=np.float32))
    path = write_elasticsearch(str(tmp_path / "small"), "toy", ["d"], small, VOCAB)["bulk"][0]
    written = json.loads(open(path, encoding="utf-8").read().splitlines()[1])["tokens"]
    assert written == {"[PAD]": 1.7e-6, "%2E": 0.3, "u%2Es": 1234.57}
    clauses = elasticsearch_query({"u.s": 0.5, "machine": 1.0})["query"]["bool"]["should"]
    assert clauses[0]["rank_feature"] == {"field": "tokens.u%2Es", "linear": {}, "boost": 0.5}


def test_elasticsearch_bulk_is_cut_into_requests_the_engines_take(tmp_path):
    """One bulk.ndjson for the whole corpus: ~3.5 KB a document, so past ~28k documents a file no POST /_bulk takes
    (http.max_content_length, 100 MB by default)."""
    docs = sparse_random(40, len(VOCAB), density=0.6, format="csr", dtype=np.float32, random_state=0) + 0.0
    ids = [f"d{i}" for i in range(40)]
    whole = write_elasticsearch(str(tmp_path / "whole"), "toy", ids, docs, VOCAB)["bulk"]
    parts = write_elasticsearch(str(tmp_path / "parts"), "toy", ids, docs, VOCAB, part_bytes=1000)["bulk"]
    assert len(whole) == 1 and len(parts) > 3
    assert [os.path.basename(path) for path in parts] == [f"bulk-{n:05d}.ndjson" for n in range(1, len(parts) + 1)]
    sizes = [os.path.getsize(path) for path in parts]
    assert max(sizes) <= 1000 and sum(sizes) == os.path.getsize(whole[0])
    joined = b"".join(open(path, "rb").read() for path in parts)
    assert joined == open(whole[0], "rb").read()  # cut between documents, never inside an action/source pair
    assert all(len(open(path, encoding="utf-8").read().splitlines()) % 2 == 0 for path in parts)


def test_elasticsearch_commands_send_the_exported_files(tiny_random_checkpoint, tmp_path):
    """export.json's three commands, run as written from the dataset's export folder against a stand-in server,
    send the mapping, every bulk part byte for byte, a refresh, and each query's search body."""
    import shutil
    import subprocess

    from fles1.evaluation import evaluate
    from test_eval import write_beir

    if not (shutil.which("curl") and shutil.which("jq")):
        pytest.skip("the commands need curl and jq on PATH")
    data, export = write_beir(tmp_path / "toy"), tmp_path / "export"
    evaluate(tiny_random_checkpoint, [data], threshold=0.0, export_dir=str(export), cache_dir=None, bm25=False,
             production=False)
    folder = export / "toy"
    manifest = json.loads((folder / "elasticsearch" / "export.json").read_text())["elasticsearch"]
    server, requests = _stand_in_elasticsearch({("POST", "/_bulk"): (200, b'{"took": 1, "errors": false}')})
    try:
        environment = {**os.environ, "ES": f"http://127.0.0.1:{server.server_address[1]}"}
        for step in ("create_index_command", "index_command", "search_command"):
            # POSIX sh (dash here, what subprocess(shell=True) and Docker's RUN use), not only bash
            done = subprocess.run(["sh", "-c", manifest[step]], cwd=folder, env=environment, timeout=60,
                                  capture_output=True, text=True)
            assert done.returncode == 0, (step, done.stderr)
    finally:
        server.shutdown()
    parts = sorted((folder / "elasticsearch").glob("bulk-*.ndjson"))
    queries = [json.loads(line) for line in (folder / "elasticsearch" / "queries.jsonl").read_text().splitlines()]
    assert [request[:2] for request in requests] == [("PUT", "/toy")] + [("POST", "/_bulk")] * len(parts) + [
        ("POST", "/toy/_refresh")] + [("POST", "/toy/_search")] * len(queries)
    assert requests[0][3] == (folder / "elasticsearch" / "mapping.json").read_bytes()
    assert [request[3] for request in requests[1:1 + len(parts)]] == [part.read_bytes() for part in parts]
    assert all(request[2] == "application/x-ndjson" for request in requests[1:1 + len(parts)])
    assert [json.loads(request[3]) for request in requests[-len(queries):]] == [query["body"] for query in queries]
    # each response beside its query's id, one line per query
    responses = (folder / "elasticsearch-responses.tsv").read_text().splitlines()
    assert [line.split("\t") for line in responses] == [[query["id"], "{}"] for query in queries]
    bulk_responses = (folder / "elasticsearch-bulk-responses.ndjson").read_text().splitlines()
    assert [json.loads(line)["errors"] for line in bulk_responses] == [False] * len(parts)


def _stand_in_elasticsearch(answers: dict):
    """A local HTTP server answering (method, path suffix) -> (status, body), 200 {} otherwise; returns (server, the
    requests it got: method, path, content type, body)."""
    import http.server
    import threading

    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            requests.append((self.command, self.path, self.headers.get("Content-Type"), body))
            status, body = next((answer for (method, suffix), answer in answers.items()
                                 if method == self.command and self.path.endswith(suffix)), (200, b"{}"))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_POST = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, requests


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_elasticsearch_commands_fail_where_the_engine_refuses(tmp_path, shell):
    """export.json's commands exited 0 whatever the server answered -- an index that exists already (400), a bulk
    request with failed items, a failing search -- so `create && index && search` went on to search a short or old
    index and wrote a full-looking responses file; without $ES set they exited 0 with nothing done."""
    import shutil
    import subprocess

    from fles1.exports import elasticsearch_commands, write_elasticsearch, write_elasticsearch_queries

    if not (shutil.which("curl") and shutil.which("jq") and shutil.which(shell)):
        pytest.skip(f"the commands need curl, jq and {shell} on PATH")
    matrix = csr_matrix(np.array([[0.5, 0.0], [0.0, 1.5]]))
    write_elasticsearch(str(tmp_path / "elasticsearch"), "toy", ["d1", "d2"], matrix, ["a", "b"])
    write_elasticsearch_queries(str(tmp_path / "elasticsearch" / "queries.jsonl"), ["q1", "q2"], matrix, ["a", "b"])
    commands = elasticsearch_commands("toy")

    def run(step, answers, es=True):
        server, requests = _stand_in_elasticsearch(answers)
        try:
            environment = {name: value for name, value in os.environ.items() if name != "ES"}
            if es:
                environment["ES"] = f"http://127.0.0.1:{server.server_address[1]}"
            done = subprocess.run([shell, "-c", commands[step]], cwd=tmp_path, env=environment, timeout=60,
                                  capture_output=True, text=True)
        finally:
            server.shutdown()
        return done, [request[:2] for request in requests]

    done, _ = run("create_index_command", {("PUT", "/toy"): (400, b'{"error": {"type": '
                                                                  b'"resource_already_exists_exception"}}')})
    assert done.returncode != 0 and "resource_already_exists_exception" in done.stdout
    done, requests = run("index_command", {("POST", "/_bulk"): (200, b'{"errors": true, "items": [{"index": '
                                                                     b'{"status": 400}}]}')})
    assert done.returncode != 0 and "bulk-00001.ndjson: refused" in done.stderr
    assert ("POST", "/toy/_refresh") not in requests  # stopped at the failed part
    assert json.loads((tmp_path / "elasticsearch-bulk-responses.ndjson").read_text())["errors"] is True
    done, requests = run("search_command", {("POST", "/_search"): (500, b'{"error": "boom"}')})
    assert done.returncode != 0 and requests == [("POST", "/toy/_search")]  # the first failure stops the searches
    assert sorted(os.listdir(tmp_path)) == ["elasticsearch", "elasticsearch-bulk-responses.ndjson",
                                            "elasticsearch-responses.tsv"]  # no scratch file left behind
    for step in commands:
        done, requests = run(step, {}, es=False)
        assert done.returncode != 0 and "set ES to the server URL" in done.stderr and requests == []
    # the same commands against an engine that takes everything: exit 0; an empty part (empty corpus) is not sent
    done, requests = run("index_command", {("POST", "/_bulk"): (200, b'{"errors": false, "items": []}')})
    assert done.returncode == 0 and requests == [("POST", "/_bulk"), ("POST", "/toy/_refresh")]
    write_elasticsearch(str(tmp_path / "elasticsearch"), "toy", [], csr_matrix((0, 2)), ["a", "b"])
    assert (tmp_path / "elasticsearch" / "bulk-00001.ndjson").stat().st_size == 0
    done, requests = run("index_command", {})
    assert done.returncode == 0 and requests == [("POST", "/toy/_refresh")], done.stderr


def test_exports_refuse_negative_or_nan_weights(tmp_path):
    """A negative weight reached the Anserini files (a negative impact; a query of only negative weights became the
    empty line that stops Anserini's whole search) while Elasticsearch's files left it out: refused, named."""
    from fles1.exports import (empty_impact_rows, quantize, write_anserini_queries, write_elasticsearch,
                               write_elasticsearch_queries, write_pyserini)

    negative = csr_matrix(np.array([[0.5, 0.0], [0.3, -0.2]]))
    for write in (write_anserini_queries, write_pyserini, write_elasticsearch_queries):
        with pytest.raises(ValueError, match=rf"{write.__name__}: row 1 has the weight -0.2 \(column 1\); the exports "
                                             r"take weights >= 0"):
            write(str(tmp_path / "out"), ["q1", "q2"], negative, ["a", "b"])
    with pytest.raises(ValueError, match=r"write_elasticsearch: row 0 has the weight nan"):
        write_elasticsearch(str(tmp_path / "es"), "toy", ["d1"], csr_matrix(np.array([[np.nan, 1.0]])), ["a", "b"])
    with pytest.raises(ValueError, match=r"write_elasticsearch_queries: row 0 has the weight inf"):  # "Infinity"
        write_elasticsearch_queries(str(tmp_path / "q"), ["q1"], csr_matrix(np.array([[0.5, np.inf]])), ["a", "b"])
    with pytest.raises(ValueError, match=r"quantize: a weight of 3e\+07 at scale 100 is past the int32 impacts"):
        quantize(csr_matrix(np.array([[3e7, 1.0]])))  # wrapped to a negative impact
    with pytest.raises(ValueError, match=r"quantize: row 1 has the weight -0.2"):
        empty_impact_rows(["q1", "q2"], negative)
    assert not [name for name in os.listdir(tmp_path)]  # refused before anything is written
    assert quantize(csr_matrix(np.array([[0.0, 0.004, 0.5]]))).toarray().tolist() == [[0, 0, 50]]


def test_a_dataset_judging_own_id_documents_relevant_keeps_them_everywhere(tiny_random_checkpoint, tmp_path):
    """Query "1" judged document "1" relevant (ids that only share their spelling): eval, BM25 and the exports
    dropped that hit as the query's own document (BEIR's convention for datasets whose queries are documents), so
    the judgement could never count -- NDCG 0 for every system, without a word."""
    from fles1.evaluation import evaluate
    from test_eval import write_beir

    corpus = [{"_id": str(i), "title": title, "text": text} for i, (title, text) in enumerate([
        ("Vitamin D", "Vitamin D deficiency and bone health in older adults."),
        ("Statins", "Cholesterol lowering statin drugs and breast cancer risk."),
        ("Green tea", "Green tea polyphenols in cancer prevention trials.")])]
    queries = [{"_id": "1", "text": "statin drugs breast cancer"}, {"_id": "2", "text": "green tea cancer"}]
    data = write_beir(tmp_path / "ints", corpus, queries, [("1", "1", 1), ("2", "2", 1)])
    export = tmp_path / "export"
    with pytest.warns(UserWarning, match=r"ints: 2 relevant judgement\(s\) pair a query with the document of its own "
                                         r"id \(e\.g\. '1'\)"):
        results = evaluate(tiny_random_checkpoint, [data], threshold=0.0, export_dir=str(export), cache_dir=None,
                           bm25=True, production=False, run_file=str(tmp_path / "run.trec"))
    entry = results["datasets"]["ints"]
    assert entry["own_id_judgements"] == 2
    assert entry["bm25"]["metrics"]["ndcg@10"] == 1.0  # each query's words are its own-id document's only
    from fles1.metrics import read_trec_run

    run = read_trec_run(str(tmp_path / "run.trec"))
    assert "1" in run["1"] and "2" in run["2"]
    queries_exported = [json.loads(line) for line in (export / "ints" / "elasticsearch" / "queries.jsonl").open()]
    assert all("must_not" not in query["body"]["query"]["bool"] for query in queries_exported)
    anserini = json.loads((export / "ints" / "pyserini" / "export.json").read_text())["pyserini"]["search_command"]
    assert "-removeQuery" not in anserini and anserini.endswith(" -hits 1000")


def test_a_query_judged_only_non_relevant_is_counted_and_named(tiny_random_checkpoint, tmp_path):
    """A query whose judgements are all grade 0 scores 0 on every metric whatever the model does: said, not silent."""
    from fles1.evaluation import evaluate
    from test_eval import QRELS, QUERIES, write_beir

    data = write_beir(tmp_path / "toy", qrels=QRELS + [("q5", "d1", 0)],
                      queries=QUERIES + [{"_id": "q5", "text": "vitamin"}])
    with pytest.warns(UserWarning, match=r"toy: 1 of 5 judged queries have no relevant document \(grade > 0; first: "
                                         r"'q5'\): they score 0 on every metric"):
        results = evaluate(tiny_random_checkpoint, [data], cache_dir=None, bm25=False, production=False)
    assert results["datasets"]["toy"]["queries_without_relevant"] == 1


def test_elasticsearch_commands_quote_what_an_index_name_may_hold():
    """An index name keeps characters a URL reserves or a shell expands inside double quotes: percent-encoded."""
    from fles1.exports import elasticsearch_commands, elasticsearch_index_name

    name = elasticsearch_index_name("Médecine & $HOME `x` 100%")
    assert name == "médecine-&-$home-`x`-100%"  # what Elasticsearch accepts as an index name
    commands = elasticsearch_commands(name)
    encoded = "m%C3%A9decine-%26-%24home-%60x%60-100%25"
    assert all(f'"$ES/{encoded}' in command for command in commands.values())


def test_exported_queries_score_as_eval_ranks(tiny_random_checkpoint, tmp_path):
    """Only documents were exported: a user had to re-encode the queries at the same threshold and quantize them
    to search the exported index as eval did, and nothing said which threshold or model the files came from."""
    from fles1.evaluation import evaluate
    from fles1.metrics import read_trec_run
    from test_eval import write_beir

    data, export = write_beir(tmp_path / "toy"), tmp_path / "export"
    results = evaluate(tiny_random_checkpoint, [data], threshold=0.3, export_dir=str(export), cache_dir=None,
                       bm25=False, production=False, run_file=str(tmp_path / "run.trec"))
    run = read_trec_run(str(tmp_path / "run.trec"))
    elasticsearch, pyserini = export / "toy" / "elasticsearch", export / "toy" / "pyserini"
    for folder in (elasticsearch, pyserini):
        manifest = json.loads((folder / "export.json").read_text())
        assert manifest["threshold"] == 0.3 and manifest["model_fingerprint"] == results["model"]["fingerprint"]
        assert (manifest["documents"], manifest["queries"], manifest["split"]) == (6, 4, "test")
        assert manifest["model"] == tiny_random_checkpoint  # named, as eval_fles1.py --help says
    assert json.loads((pyserini / "export.json").read_text())["pyserini"]["impact_scale"] == 100
    # the Elasticsearch export said what it held but not how to load and search it (the help promised commands)
    commands = json.loads((elasticsearch / "export.json").read_text())["elasticsearch"]
    assert 'curl -sS --fail-with-body -XPUT "$ES/toy" ' in commands["create_index_command"]
    assert commands["create_index_command"].endswith("--data-binary @elasticsearch/mapping.json")
    assert "elasticsearch/bulk-*.ndjson" in commands["index_command"]
    assert '"$ES/toy/_refresh"' in commands["index_command"]
    assert "elasticsearch/queries.jsonl" in commands["search_command"]
    assert '"$ES/toy/_search"' in commands["search_command"]
    assert "DIR/<dataset>" in commands["run_from"] and commands["index"] == "toy"
    # Anserini indexes every file of --input: the collection has a folder of its own
    assert os.listdir(pyserini / "collection") == ["docs.jsonl"]
    assert "--input pyserini/collection " in json.loads((pyserini / "export.json").read_text())["pyserini"][
        "index_command"]
    # Elasticsearch: sum over the query's clauses of boost * the document's rank_features value (linear)
    bulk = [json.loads(line) for line in (elasticsearch / "bulk-00001.ndjson").read_text().splitlines()[1::2]]
    documents = {doc["id"]: doc["tokens"] for doc in bulk}
    queries = [json.loads(line) for line in (elasticsearch / "queries.jsonl").read_text().splitlines()]
    assert [query["id"] for query in queries] == ["q1", "q2", "q3", "q4"] and queries[0]["body"]["size"] == 1000
    # ids and scores only: each of 1000 hits carried its document's whole vector (~5 MB a response on nfcorpus)
    assert all(query["body"]["_source"] is False and query["body"]["track_total_hits"] is False for query in queries)
    # a blank query matches nothing (a bool without clauses matches every document)
    assert queries[2]["body"]["query"] == {"match_none": {}} and run.get("q3", {}) == {}
    for query in queries[:2] + queries[3:]:
        assert query["body"]["query"]["bool"]["must_not"] == [{"ids": {"values": [query["id"]]}}]  # no self-hit
        clauses = query["body"]["query"]["bool"]["should"]
        scores = {doc_id: sum(clause["rank_feature"]["boost"] * features.get(
            clause["rank_feature"]["field"].split(".", 1)[1], 0.0) for clause in clauses)
            for doc_id, features in documents.items() if doc_id != query["id"]}
        expected = run.get(query["id"], {})
        assert {d for d, score in scores.items() if score > 0} == set(expected)
        for doc_id, score in expected.items():
            assert scores[doc_id] == pytest.approx(score, abs=1e-4)
    # Anserini: a token repeated n times is an impact of n, the documents' impacts are round(100 w)
    # a blank query is left out (Anserini's TsvString reader failed the whole search on "q3\t"), and named
    lines = (pyserini / "queries.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["q1", "q2", "q4"]
    assert all(line.split("\t")[1].strip() for line in lines)
    anserini = json.loads((pyserini / "export.json").read_text())["pyserini"]
    assert anserini["empty_impact_queries"] == ["q3"]
    # documents without an impact Anserini skips as empty (EmptyDocumentException): named, so counts can be matched
    collection = [json.loads(line) for line in (pyserini / "collection" / "docs.jsonl").read_text().splitlines()]
    assert anserini["empty_impact_documents"] == [doc["id"] for doc in collection if not doc["vector"]]
    # Anserini drops the query's own id after its -hits cut: 1001 keeps 1000 others, as eval does
    assert anserini["search_command"].endswith("-removeQuery -hits 1001")
    assert anserini["search_command"].startswith("java -cp ANSERINI_JAR io.anserini.search.SearchCollection")
    assert "pyserini/queries.tsv" in anserini["search_command"] and "DIR/<dataset>" in anserini["run_from"]
    impacts = {line.split("\t")[0]: collections.Counter(line.split("\t")[1].split()) for line in lines}
    for query in queries[:2] + queries[3:]:
        clauses = query["body"]["query"]["bool"]["should"]
        assert impacts[query["id"]] == {token_from_feature_name(c["rank_feature"]["field"].split(".", 1)[1]):
                                        round(100 * c["rank_feature"]["boost"]) for c in clauses}


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
    assert len(before) == 7  # per engine: documents, queries, export.json (+ Elasticsearch's mapping)

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
    bulk = export / "toy" / "elasticsearch" / "bulk-00001.ndjson"

    def exported_weights():
        return [w for line in bulk.read_text().splitlines()[1::2] for w in json.loads(line)["tokens"].values()]

    threshold = 0.0
    for export_number in range(2):  # a first export, then a replacing one at the first's median weight
        evaluate(tiny_random_checkpoint, [data], threshold=threshold, export_dir=str(export), cache_dir=None,
                 bm25=False, production=False, run_file=str(export / "toy" / "run.trec"))
        assert sorted(path.name for path in (export / "toy").iterdir()) == ["elasticsearch", "pyserini", "run.trec"]
        if export_number == 0:
            first = exported_weights()
            threshold = float(np.median(first))
    second = exported_weights()  # the replacing export's, not the first's (the random model's weights are small)
    assert 0 < len(second) < len(first) and min(second) >= threshold
    assert len(second) == sum(weight >= threshold for weight in first)


def test_datasets_whose_names_clean_to_one_index_get_an_index_each(tiny_random_checkpoint, tmp_path):
    """Folders "Tiny" and "tiny" (or "nf corpus" and "nf-corpus") were exported into one Elasticsearch index: the
    two corpora mixed, and a shared _id overwrote the other dataset's document."""
    from fles1.evaluation import elasticsearch_index_names, evaluate
    from test_eval import write_beir

    assert elasticsearch_index_names(["nf corpus", "nf-corpus", "NF-corpus-2", "other"]) == {
        "nf corpus": "nf-corpus", "nf-corpus": "nf-corpus-3", "NF-corpus-2": "nf-corpus-2", "other": "other"}
    long = elasticsearch_index_names(["a" * 300, "A" * 300])
    assert long["A" * 300] == "a" * 253 + "-2" and len(long["a" * 300]) == 255
    data = [write_beir(tmp_path / "one" / "Tiny"), write_beir(tmp_path / "two" / "tiny")]
    evaluate(tiny_random_checkpoint, data, threshold=0.3, export_dir=str(tmp_path / "export"), cache_dir=None,
             bm25=False, production=False)
    indices = {}
    for name in ("Tiny", "tiny"):
        folder = tmp_path / "export" / name / "elasticsearch"
        actions = [json.loads(line) for line in (folder / "bulk-00001.ndjson").read_text().splitlines()[::2]]
        indices[name] = {action["index"]["_index"] for action in actions}
        assert indices[name] == {json.loads((folder / "export.json").read_text())["elasticsearch"]["index"]}
    assert indices == {"Tiny": {"tiny"}, "tiny": {"tiny-2"}}


@pytest.mark.parametrize("write", [
    lambda path, ids, matrix, vocab: write_elasticsearch(str(path), "x", ids, matrix, vocab),
    lambda path, ids, matrix, vocab: write_elasticsearch_queries(str(path / "q.jsonl"), ids, matrix, vocab),
    lambda path, ids, matrix, vocab: write_pyserini(str(path / "docs.jsonl"), ids, matrix, vocab),
    lambda path, ids, matrix, vocab: write_anserini_queries(str(path / "topics.tsv"), ids, matrix, vocab),
], ids=["elasticsearch", "elasticsearch_queries", "pyserini", "anserini_queries"])
def test_exports_refuse_ids_or_vocabulary_that_do_not_fit_the_matrix(write, tmp_path):
    """One id short, the rows past it were left out of the export without a word; a short vocabulary was an
    IndexError."""
    matrix = csr_matrix(np.array([[0, 1.5, 0, 2.0], [0.5, 0, 0, 0]], dtype=np.float32))
    vocab = ["a", "b", "c", "d"]
    for ids in (["r1"], ["r1", "r2", "r3"]):
        with pytest.raises(ValueError, match=rf"{len(ids)} ids for a matrix of 2 rows"):
            write(tmp_path / "out", ids, matrix, vocab)
    with pytest.raises(ValueError, match="a vocabulary of 3 terms for a matrix of 4 columns"):
        write(tmp_path / "out", ["r1", "r2"], matrix, vocab[:3])
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # nothing written
    for folder, ids in (("ok", ["r1", "r2"]), ("iterable", (r for r in ["r1", "r2"]))):  # any iterable of ids
        (tmp_path / folder).mkdir()
        write(tmp_path / folder, ids, matrix, vocab)
    assert sorted(os.listdir(tmp_path / "ok")) == sorted(os.listdir(tmp_path / "iterable"))
    for name in os.listdir(tmp_path / "ok"):
        assert (tmp_path / "ok" / name).read_bytes() == (tmp_path / "iterable" / name).read_bytes()


def test_elasticsearch_query_leaves_out_weights_that_are_not_positive():
    """A weight that is not positive scores nothing in eval: no clause for it, and a vector of zeros matches
    nothing (an empty bool query would match every document)."""
    assert elasticsearch_query({"a": 0.0}) == {"query": {"match_none": {}}}
    clauses = elasticsearch_query({"a": 0.0, "b": 1.5})["query"]["bool"]["should"]
    assert [clause["rank_feature"]["boost"] for clause in clauses] == [1.5]


def test_impacts_that_round_to_zero_leave_no_entry_and_no_query_line(tmp_path):
    """A query whose weights all round to 0 wrote 'q1\\t' (Anserini stops the whole search there) and a
    pyserini vector {'a': 0} when the rounding kept its zeros."""
    from fles1.exports import empty_impact_rows

    matrix = csr_matrix(np.array([[0.001, 0.002, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 2.0, 0, 0, 0]],
                                 dtype=np.float32))
    assert quantize(matrix).nnz == 1
    assert empty_impact_rows(["q1", "q2"], matrix) == ["q1"]
    lines = open(write_anserini_queries(str(tmp_path / "q.tsv"), ["q1", "q2"], matrix, VOCAB)).read().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["q2"]
    vectors = [json.loads(line)["vector"] for line in open(write_pyserini(str(tmp_path / "d.jsonl"), ["d1", "d2"],
                                                                         matrix, VOCAB))]
    assert vectors[0] == {} and vectors[1] == {"machine": 200}


def test_an_empty_corpus_exports_one_empty_bulk_part_and_index_names_are_cleaned(tmp_path):
    from fles1.exports import elasticsearch_index_name

    paths = write_elasticsearch(str(tmp_path), "x", [], csr_matrix((0, len(VOCAB)), dtype=np.float32), VOCAB)
    assert [os.path.basename(path) for path in paths["bulk"]] == ["bulk-00001.ndjson"]
    assert open(paths["bulk"][0]).read() == ""
    # Elasticsearch refuses names starting with - _ +, upper case, spaces and its reserved characters
    assert elasticsearch_index_name("_My Data") == "my-data"
    assert elasticsearch_index_name("+-x/y") == "x-y"
    assert elasticsearch_index_name("..") == "fles1"
