"""eval_fles1.py on a small BEIR fixture written here: data errors, BEIR conventions, metrics, cache, outputs."""

import gzip
import io
import json
import math
import os
import shutil

import numpy as np
import pytest
from scipy.sparse import csr_matrix, hstack, random as sparse_random

import eval_fles1
from fles1.beir import BEIRDataError, load_beir
from fles1.evaluation import encode_corpus, evaluate, markdown_tables
from fles1.metrics import evaluate_run, read_trec_run, write_trec_run
from fles1.retrieval import InvertedIndex, apply_threshold, top_k_rows

CORPUS = [
    {"_id": "d1", "title": "Vitamin D", "text": "Vitamin D deficiency and bone health in older adults."},
    {"_id": "d2", "title": "Statins", "text": "Cholesterol lowering statin drugs and breast cancer risk."},
    {"_id": "d3", "title": "Green tea", "text": "Green tea polyphenols in cancer prevention trials."},
    {"_id": "d4", "title": "", "text": "Dietary fiber intake and colon cancer."},
    {"_id": "q2", "title": "Same id as a query", "text": "Statin drugs cholesterol breast cancer."},
    {"_id": "d6", "title": "Empty", "text": ""},
]
QUERIES = [
    {"_id": "q1", "text": "vitamin D bones"},
    {"_id": "q2", "text": "statin drugs breast cancer"},
    {"_id": "q3", "text": "   "},  # encodes to an empty vector: no hits, still counted
    {"_id": "q4", "text": "green tea cancer"},
]
QRELS = [("q1", "d1", 1), ("q2", "d2", 2), ("q2", "q2", 0), ("q3", "d4", 1), ("q4", "d3", 1)]  # q2 names a document too


def write_beir(folder, corpus=CORPUS, queries=QUERIES, qrels=QRELS, split="test"):
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    with open(os.path.join(folder, "corpus.jsonl"), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in corpus)
    with open(os.path.join(folder, "queries.jsonl"), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in queries)
    with open(os.path.join(folder, "qrels", f"{split}.tsv"), "w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        handle.writelines(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)
    return str(folder)


@pytest.fixture
def beir_dir(tmp_path):
    return write_beir(tmp_path / "toy")



def test_windows_files_read_the_same(tmp_path):
    """A byte-order mark (was 'corpus.jsonl:1: malformed JSON (Unexpected UTF-8 BOM ...)') and CRLF line ends."""
    plain = load_beir(write_beir(tmp_path / "plain"))
    folder = write_beir(tmp_path / "windows")
    for name in ("corpus.jsonl", "queries.jsonl", os.path.join("qrels", "test.tsv")):
        path = os.path.join(folder, name)
        with open(path, "rb") as handle:
            lines = handle.read().splitlines()
        with open(path, "wb") as handle:
            handle.write(b"\xef\xbb\xbf" + b"".join(line + b"\r\n" for line in lines))
    windows = load_beir(folder)
    assert (windows.corpus, windows.queries, windows.qrels) == (plain.corpus, plain.queries, plain.qrels)

# ---- bad data: file and line named, nothing written ------------------------------------------------------------
def test_bad_data_names_file_and_line(tmp_path):
    folder = write_beir(tmp_path / "bad")
    with open(os.path.join(folder, "corpus.jsonl"), "a") as handle:
        handle.write('{"_id": "d7", "text": oops}\n')
    with pytest.raises(BEIRDataError, match=r"corpus\.jsonl:7: malformed JSON"):
        load_beir(folder)

    folder = write_beir(tmp_path / "unknown", qrels=QRELS + [("q1", "nope", 1)])
    with pytest.raises(BEIRDataError, match=r"test\.tsv:7: corpus id 'nope' .*eval_fles1.py --keep-missing-docs "
                                            r".*training needs such judgements removed"):
        load_beir(folder)
    folder = write_beir(tmp_path / "unknown-query", qrels=QRELS + [("q9", "d1", 1)])
    with pytest.raises(BEIRDataError, match=r"test\.tsv:7: query id 'q9' is not in queries\.jsonl"):
        load_beir(folder, keep_missing_documents=True)  # keeps documents, never queries

    with pytest.raises(BEIRDataError, match=r"qrels/dev\.tsv: file not found \(splits here: test\)$"):
        load_beir(write_beir(tmp_path / "split"), split="dev")
    folder = write_beir(tmp_path / "gzipped")  # was "(splits here: none)" beside qrels/test.tsv.gz
    qrels = os.path.join(folder, "qrels", "test.tsv")
    with open(qrels, "rb") as plain, gzip.open(qrels + ".gz", "wb") as packed:
        packed.write(plain.read())
    os.remove(qrels)
    with pytest.raises(BEIRDataError, match=r"test\.tsv: file not found \(splits here: none\); .*test\.tsv\.gz is "
                                            r"gzipped: gunzip it$"):
        load_beir(folder)

    # qrels are never quoted: a '"' opening an id glued the lines up to the next '"' into one id (judgements lost)
    quoted = [{"_id": '"d0', "title": "", "text": "zero"}, {"_id": 'd9"', "title": "", "text": "nine"}]
    folder = write_beir(tmp_path / "quoted", corpus=CORPUS + quoted,
                        qrels=[("q1", '"d0', 1), ("q2", "d2", 1), ("q4", 'd9"', 1)])
    assert load_beir(folder).qrels == {"q1": {'"d0': 1}, "q2": {"d2": 1}, "q4": {'d9"': 1}}

    # the same id or pair twice, differently: the last one used to win silently; identical repeats are harmless
    repeated = CORPUS + [dict(CORPUS[0])]
    same, plain = load_beir(write_beir(tmp_path / "same", corpus=repeated)), load_beir(write_beir(tmp_path / "ok"))
    assert same.corpus == plain.corpus
    folder = write_beir(tmp_path / "dup", corpus=CORPUS + [{**CORPUS[0], "text": "another text"}])
    with pytest.raises(BEIRDataError, match=r"corpus\.jsonl:7: _id 'd1' again, with another text \(first at line 1"):
        load_beir(folder)
    folder = write_beir(tmp_path / "retitled", corpus=CORPUS + [{**CORPUS[0], "title": "another title"}])
    with pytest.raises(BEIRDataError, match=r"corpus\.jsonl:7: _id 'd1' again, with another text"):  # encoded too
        load_beir(folder)
    # blank lines (a trailing newline too many, an editor's blank line) are no rows
    folder = write_beir(tmp_path / "blank")
    with open(os.path.join(folder, "corpus.jsonl"), "a") as handle:
        handle.write("\n   \n" + json.dumps({"_id": "d99", "title": "", "text": "late"}) + "\n\n")
    assert len(load_beir(folder).corpus) == len(CORPUS) + 1
    folder = write_beir(tmp_path / "rejudged", qrels=QRELS + [(QRELS[0][0], QRELS[0][1], QRELS[0][2] + 1)])
    with pytest.raises(BEIRDataError, match=r"test\.tsv:7: .* judged again with another score"):
        load_beir(folder)


@pytest.mark.parametrize("line, message", [
    (b'{"_id": "d7", "text": "caf\xe9"}\n', r"corpus\.jsonl:7: not UTF-8 \(byte 0xe9 at 26\)"),  # Latin-1 bytes
    (b'{"_id": "d7", "text": "broken \\ud83d escape"}\n', r"corpus\.jsonl:7: 'text' holds a lone surrogate"),
    # pytrec_eval crashed the process (SIGSEGV) on such an id, after the whole corpus had been encoded
    (b'{"_id": "d\\ud83d", "text": "x"}\n', r"corpus\.jsonl:7: '_id' holds a lone surrogate '\\ud83d' at character 1"),
    # pytrec_eval cut the id at the NUL: a KeyError traceback once the corpus was encoded
    (b'{"_id": "d\\u0000z", "text": "x"}\n', r"corpus\.jsonl:7: '_id' holds a NUL character \(\\u0000\) at character 1"),
    (b'{"_id": "d7", "title": ["a", "list"]}\n', r"corpus\.jsonl:7: 'title' is list, expected a string"),
    (b'{"_id": "d7", "text": 42}\n', r"corpus\.jsonl:7: 'text' is int, expected a string"),
])
def test_bad_document_text_names_file_and_line(tmp_path, line, message):
    """Each used to pass silently (a list encoded as "['a', 'list']") or fail later without naming the file."""
    folder = write_beir(tmp_path / "bad")
    with open(os.path.join(folder, "corpus.jsonl"), "ab") as handle:
        handle.write(line)
    with pytest.raises(BEIRDataError, match=message):
        load_beir(folder)


def test_null_text_fields_and_a_missing_title_are_empty(tmp_path):
    data = load_beir(write_beir(tmp_path / "nulls", corpus=CORPUS + [{"_id": "d7", "title": None, "text": None},
                                                                     {"_id": 8, "text": "no title"}]))
    assert data.corpus["d7"] == {"title": "", "text": ""} and data.document_text("d7") == ""
    assert data.corpus["8"] == {"title": "", "text": "no title"}  # an integer id is its decimal string


@pytest.mark.parametrize("file, line, message", [
    # keyed otherwise: encoded as blank, every score 0 without a word
    ("queries.jsonl", '{"_id": "q9", "query": "coffee"}', r"queries\.jsonl:\d+: no 'text' field .*this one has \['_id', 'query'\]"),
    ("corpus.jsonl", '{"_id": "d9", "contents": "x"}', r"corpus\.jsonl:7: no 'text' field .*\['_id', 'contents'\]"),
    # ids that became 'None', 'True', "['a']" or ''
    ("corpus.jsonl", '{"_id": null, "text": "x"}', r"corpus\.jsonl:7: '_id' must be a non-empty string or an integer, got None"),
    ("corpus.jsonl", '{"_id": true, "text": "x"}', r"corpus\.jsonl:7: '_id' must be .*, got True"),
    ("queries.jsonl", '{"_id": ["a"], "text": "x"}', r"queries\.jsonl:\d+: '_id' must be .*, got \['a'\]"),
    ("corpus.jsonl", '{"_id": "", "text": "x"}', r"corpus\.jsonl:7: '_id' must be .*, got ''"),
])
def test_rows_without_text_or_with_odd_ids_name_file_and_line(tmp_path, file, line, message):
    folder = write_beir(tmp_path / "bad")
    with open(os.path.join(folder, file), "a") as handle:
        handle.write(line + "\n")
    with pytest.raises(BEIRDataError, match=message):
        load_beir(folder)


def test_hub_dataset_that_cannot_load_is_named(tmp_path, tiny_random_checkpoint, capsys):
    # offline (conftest: HF_HUB_OFFLINE=1, as on CI and here): datasets' ConnectionError becomes one error line
    with pytest.raises(BEIRDataError, match=r"^BeIR/no-such-set: no local file or folder of that name, and could not "
                                            r"load it from the Hugging Face Hub"):
        load_beir("BeIR/no-such-set")
    argv = ["--model", tiny_random_checkpoint, "--data", "BeIR/no-such-set", "--output", str(tmp_path / "r.json")]
    assert eval_fles1.main(argv) == 2
    assert "error: BeIR/no-such-set: no local file or folder of that name, and could not load it" in \
        capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_cli_bad_data_exits_2_and_writes_nothing(tmp_path, tiny_random_checkpoint, capsys):
    good = write_beir(tmp_path / "good")
    bad = write_beir(tmp_path / "bad", qrels=QRELS + [("q9", "d1", 1)])
    output, run_file = tmp_path / "results.json", tmp_path / "run.trec"
    argv = ["--model", tiny_random_checkpoint, "--data", good, bad, "--output", str(output),
            "--run-file", str(run_file), "--cache-dir", str(tmp_path / "cache")]
    assert eval_fles1.main(argv) == 2
    assert "test.tsv:7: query id 'q9'" in capsys.readouterr().err
    # validated before any work: no results, no run file, no cache entry, no temporaries
    assert sorted(os.listdir(tmp_path)) == ["bad", "good"]



@pytest.mark.parametrize("option, value, message", [
    ("--cache-dir", "afile/cache", "--cache-dir {}/afile/cache: cannot be written, {}/afile is a file"),
    ("--output", "afile/deeper/results.json",
     "--output {}/afile/deeper/results.json: cannot be written, {}/afile is a file"),
    ("--markdown", ".", "--markdown {}: exists and is a folder"),
    ("--run-file", "good", "--run-file {}/good: exists and is a folder"),
    ("--index-dir", "afile", "--index-dir {}/afile: exists and is not a folder"),
    ("--export", "afile/x", "--export {}/afile/x: cannot be written, {}/afile is a file"),
])
def test_cli_unwritable_outputs_fail_before_any_work(tmp_path, tiny_random_checkpoint, capsys, monkeypatch, option,
                                                     value, message):
    from fles1_encoder import FLES1Encoder

    good = write_beir(tmp_path / "good")
    (tmp_path / "afile").write_text("a file where a folder is needed")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(FLES1Encoder, "encode_batch", lambda *a, **k: pytest.fail("encoded before the check"))
    argv = ["--model", tiny_random_checkpoint, "--data", good, option, value]
    if option != "--cache-dir":
        argv += ["--cache-dir", str(tmp_path / "cache")]
    assert eval_fles1.main(argv) == 2
    assert f"error: {message.format(tmp_path, tmp_path)}" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["afile", "good"]  # nothing created

@pytest.mark.parametrize("option, value, message", [
    ("--threshold", "-1", "a finite number >= 0"), ("--threshold", "nan", "a finite number >= 0"),
    ("--threshold", "inf", "a finite number >= 0"),  # was accepted: the results JSON then held `Infinity`
    ("--latency-queries", "0", "an int >= 1"), ("--latency-queries", "-5", "an int >= 1"),  # -5 sliced all but 5
    ("--batch-size", "x", "an int >= 1"),
])
def test_cli_bad_numbers_are_usage_errors(tmp_path, tiny_random_checkpoint, capsys, option, value, message):
    argv = ["--model", tiny_random_checkpoint, "--data", write_beir(tmp_path / "toy"), option, value]
    with pytest.raises(SystemExit) as exit_:
        eval_fles1.main(argv)
    assert exit_.value.code == 2 and f"argument {option}: must be {message}, got {value!r}" in capsys.readouterr().err


def test_cli_unusable_device_exits_2(tmp_path, tiny_random_checkpoint, capsys):
    argv = ["--model", tiny_random_checkpoint, "--data", write_beir(tmp_path / "toy"), "--device", "cuda:99"]
    assert eval_fles1.main(argv) == 2
    assert "error: device='cuda:99' is not usable here" in capsys.readouterr().err


# ---- retrieval ---------------------------------------------------------------------------------------------------
def test_inverted_index_exact_top_k_and_conventions():
    docs = sparse_random(300, 500, density=0.03, format="csr", dtype=np.float32, random_state=0)
    queries = sparse_random(40, 500, density=0.02, format="csr", dtype=np.float32, random_state=1)
    doc_ids = [f"d{i}" for i in range(300)]
    index = InvertedIndex(docs, doc_ids)
    dense = (queries @ docs.T).toarray()
    for row, (positions, scores) in enumerate(index.search(queries, k=7)):
        nonzero = np.flatnonzero(dense[row] > 0)
        by_id = sorted(nonzero, key=lambda position: doc_ids[position], reverse=True)  # ties: trec_eval's order
        expected = np.array(sorted(by_id, key=lambda position: -dense[row][position])[:7])  # stable sort
        np.testing.assert_array_equal(positions, expected)  # only docs sharing a term are hits
        np.testing.assert_allclose(scores, dense[row][expected], rtol=1e-5)
    # a hit with the query's own id is dropped; k is still filled from the next hit
    query_ids = ["d5"] + [f"q{i}" for i in range(1, 40)]
    self_query = csr_matrix(docs[5])
    hits = index.search(self_query, k=4)
    assert index.doc_ids[hits[0][0][0]] == "d5"
    run = index.to_run(["d5"], index.search(self_query, k=4), k=3)
    assert "d5" not in run["d5"] and len(run["d5"]) == 3
    assert set(index.to_run(query_ids, index.search(queries, k=5))) == set(query_ids)
    # bad k and a 1-D vector: errors that say so (were numpy's TypeError, k=True one hit, an IndexError)
    for k in (2.5, True, 0):
        with pytest.raises(ValueError, match=rf"k must be an int >= 1, got {k!r}"):
            index.search(queries, k=k)
    with pytest.raises(ValueError, match=r"must be a \(num_queries, 500\) matrix, got shape \(500,\)"):
        index.search(queries[0].toarray()[0], k=3)
    (dense_hits, _), = index.search(queries[0].toarray(), k=3)  # a (1, vocab) dense row is fine
    assert dense_hits.tolist() == index.search(queries[0], k=3)[0][0].tolist()
    coo_hits = index.search(queries.tocoo(), k=7)  # scipy's COO cannot be sliced into query chunks: a TypeError
    assert [hit.tolist() for hit, _ in coo_hits] == [hit.tolist() for hit, _ in index.search(queries, k=7)]


def test_top_k_rows_never_returns_a_stored_zero_score():
    # a CSR can hold explicit zeros (a score that underflowed, a matrix built from (data, indices, indptr)): no term
    # shared means no hit, stored or not
    scores = csr_matrix((np.array([0.0, 2.0, 0.0], dtype=np.float32), np.array([0, 1, 2]), np.array([0, 3])),
                        shape=(1, 3))
    assert scores.nnz == 3
    (positions, values), = top_k_rows(scores, k=3)
    assert positions.tolist() == [1] and values.tolist() == [2.0]


def test_to_run_refuses_ids_that_do_not_match_the_hits_and_a_bad_k():
    docs = sparse_random(30, 50, density=0.2, format="csr", dtype=np.float32, random_state=0)
    index = InvertedIndex(docs, [f"d{i}" for i in range(30)])
    hits = index.search(docs[:2], k=5)
    with pytest.raises(ValueError, match=r"3 query ids for 2 hit lists"):  # zip dropped 'q3' from the run
        index.to_run(["q1", "q2", "q3"], hits)
    for k in (0, -1, 1.5):  # every hit came back
        with pytest.raises(ValueError, match=rf"k must be an int >= 1, got {k!r}"):
            index.to_run(["q1", "q2"], hits, k=k)
    assert [len(ranked) for ranked in index.to_run(["q1", "q2"], hits, k=2).values()] == [2, 2]
    assert index.to_run((q for q in ["q1", "q2"]), iter(hits)) == index.to_run(["q1", "q2"], hits)  # iterables


def test_inverted_index_refuses_repeated_ids_and_drops_self_hits_of_any_id_type():
    """A repeated id (passages under their document's id) kept its last hit's score in the run, not its best; an
    int query id never matched its own document's id."""
    docs = csr_matrix(np.array([[3.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=np.float32))
    with pytest.raises(ValueError, match=r"doc_ids must be unique: 'doc' names more than one row"):
        InvertedIndex(docs, ["doc", "doc", "other"])
    index = InvertedIndex(docs, [1, 2, 3])
    hits = index.search(csr_matrix(np.array([[1.0, 0.0]], dtype=np.float32)), k=3)
    assert index.to_run([1], hits) == {"1": {"3": 2.0, "2": 1.0}}  # ids are str, as in the run file
    with pytest.raises(ValueError, match=r"doc_ids must be unique: '1' names more than one row"):
        InvertedIndex(docs, [1, "1", 2])


def test_a_tie_at_the_cut_keeps_what_trec_eval_ranks_first():
    """Ties were broken by corpus position: with three equal documents and k=2 the judged 'c' (ranked first by
    trec_eval, doc id descending) was cut, so Recall@2 of the project's run was 0 where trec_eval's was 1."""
    import pytrec_eval

    docs = csr_matrix(np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.0]], dtype=np.float32))
    index = InvertedIndex(docs, ["a", "c", "b", "z"])
    run = index.to_run(["q1"], index.search(csr_matrix(np.array([[1.0, 0.0]], dtype=np.float32)), k=2))
    assert list(run["q1"]) == ["c", "b"]
    index.doc_ids = ["z", "y", "x", "a"]  # ids replaced: the order follows them
    assert list(index.to_run(["q1"], index.search(csr_matrix(np.array([[1.0, 0.0]], dtype=np.float32)), k=2))["q1"]) \
        == ["z", "y"]
    with pytest.raises(TypeError):  # edited in place, the order would go stale: the ids are a tuple
        index.doc_ids[0] = "zz"
    nul = InvertedIndex(csr_matrix(np.ones((4, 1), dtype=np.float32)), ["a", "a\x00", "b\x00\x00", "b"])
    ranked = list(nul.to_run(["q"], nul.search(csr_matrix(np.ones((1, 1), dtype=np.float32)), k=4))["q"])
    assert ranked == sorted(nul.doc_ids, reverse=True)  # Python's (trec_eval's) order, trailing NULs included
    index.doc_ids = ["a", "c", "b", "z"]
    qrels = {"q1": {"c": 1}}
    full = {"q1": {"a": 1.0, "b": 1.0, "c": 1.0, "z": 0.5}}
    recall = [pytrec_eval.RelevanceEvaluator(qrels, {"recall.2"}).evaluate(r)["q1"]["recall_2"] for r in (run, full)]
    assert recall == [1.0, 1.0]


def test_saved_index_round_trip_keeps_top10_beyond_ties(tmp_path):
    docs = sparse_random(2000, 3000, density=0.02, format="csr", dtype=np.float32, random_state=2)
    docs.data = np.log1p(docs.data * 4)
    queries = sparse_random(100, 3000, density=0.01, format="csr", dtype=np.float32, random_state=3)
    index = InvertedIndex(docs, [f"doc-{i}" for i in range(1998)] + ["two\nlines", "naïve 文"])  # any string
    size = index.save(str(tmp_path / "index.npz"))
    assert size == os.path.getsize(tmp_path / "index.npz") and not [p for p in os.listdir(tmp_path) if "tmp" in p]
    loaded = InvertedIndex.load(str(tmp_path / "index.npz"))
    assert loaded.doc_ids == index.doc_ids
    np.testing.assert_array_equal(loaded.postings.indices, index.postings.indices)
    np.testing.assert_allclose(loaded.postings.data, index.postings.data, rtol=2**-11)
    exact, approximate = (queries @ docs.T).toarray(), loaded.score(queries).toarray()
    for row, (positions, _) in enumerate(loaded.search(queries, k=10)):
        expected = index.search(queries[row], k=10)[0][0]
        for got, want in zip(positions, expected):
            # float16: every score within 2**-11 relative, so only near-ties (<= 2**-10 apart) may swap
            assert got == want or math.isclose(exact[row, got], exact[row, want], rel_tol=2**-10)
        assert np.all(np.abs(approximate[row] - exact[row]) <= exact[row] * 2**-11 + 1e-7)


@pytest.mark.parametrize("num_docs, density", [(70_000, 0.0005), (40, 0.0), (0, 0.0)])
def test_saved_index_round_trip_edge_cases(tmp_path, num_docs, density):
    """uint32 gaps (>= 65,536 documents), an index without postings, an empty corpus: the loader decodes the gaps in
    place now (its peak was ~4x the loaded index). Two terms need the wide gaps: one on the first and last document
    (a gap of num_docs - 1), one on the last only (its first posting is absolute)."""
    docs = sparse_random(num_docs, 300, density=density, format="csr", dtype=np.float32, random_state=4) + 0.0
    if num_docs > 2**16:
        far = np.zeros((num_docs, 2), dtype=np.float32)
        far[[0, -1], 0] = far[-1, 1] = 1.0
        docs = hstack([docs, csr_matrix(far)]).tocsr()
    index = InvertedIndex(csr_matrix(docs), [f"d{i}" for i in range(num_docs)])
    index.save(str(tmp_path / "index.npz"))
    loaded = InvertedIndex.load(str(tmp_path / "index.npz"))
    assert loaded.doc_ids == index.doc_ids and loaded.postings.shape == index.postings.shape
    np.testing.assert_array_equal(loaded.postings.indptr, index.postings.indptr)
    np.testing.assert_array_equal(loaded.postings.indices, index.postings.indices)
    np.testing.assert_allclose(loaded.postings.data, index.postings.data, rtol=2**-11)
    if num_docs > 2**16:
        query = csr_matrix(([1.0], ([0], [300])), shape=(1, 302), dtype=np.float32)
        assert loaded.search(query, 3)[0][0].tolist() == [num_docs - 1, 0]


def test_loading_an_index_peaks_near_its_own_size(tmp_path):
    """The loader made int64 copies, a cumulative sum and a repeat array of every posting: its peak was ~4x the
    loaded index (30M postings: 925 MB for 228 MB); it now decodes the gaps in place (~2.2x)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    docs = csr_matrix((rng.random(1_000_000, dtype=np.float32) + 0.01, rng.integers(0, 30522, 1_000_000),
                       np.arange(10_001) * 100), shape=(10_000, 30522))
    docs.sum_duplicates()
    InvertedIndex(docs, [f"d{i}" for i in range(10_000)]).save(str(tmp_path / "index.npz"))
    tracemalloc.start()
    try:
        loaded = InvertedIndex.load(str(tmp_path / "index.npz"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = loaded.postings.data.nbytes + loaded.postings.indices.nbytes + loaded.postings.indptr.nbytes
    assert peak < 3 * size, peak / size


def test_apply_threshold_keeps_compact_arrays_and_leaves_its_input_alone():
    """eliminate_zeros on a full copy kept arrays the input's size: at 0.3 a trained model keeps ~70% of entries,
    so eval held 1.4x the thresholded corpus (over a million docs, gigabytes)."""
    raw = sparse_random(50, 300, density=0.1, format="csr", dtype=np.float32, random_state=0)
    before = raw.copy()
    cut = apply_threshold(raw, 0.5)
    assert len(cut.data) == len(cut.indices) == cut.nnz == int((raw.data >= 0.5).sum()) > 0
    for array in (cut.data, cut.indices):  # not a view into a buffer of the input's size
        assert array.base is None or array.base.nbytes == array.nbytes
    assert (cut != raw.multiply(raw.toarray() >= 0.5)).nnz == 0 and cut.has_sorted_indices
    assert (raw != before).nnz == 0 and raw.nnz == before.nnz
    assert apply_threshold(raw[:0], 0.5).shape == (0, 300)
    # threshold 0 keeps the positive entries only (the encoder's rule): a stored zero is no term
    stored = csr_matrix((np.array([0.0, 0.2, 0.0], dtype=np.float32), np.array([1, 2, 3]), np.array([0, 3])),
                        shape=(1, 5))
    assert apply_threshold(stored, 0.0).indices.tolist() == [2]


def test_apply_threshold_matches_encoder_threshold(tiny_random_checkpoint, beir_dir):
    from fles1_encoder import FLES1Encoder

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu")
    texts = [f"{row['title']} {row['text']}".strip() for row in CORPUS]
    raw = encoder.encode_batch(texts, kind="document", threshold=0.0, output="csr")
    threshold = float(np.median(raw.data))  # the random model's weights are small; cut through the middle
    direct = encoder.encode_batch(texts, kind="document", threshold=threshold, output="csr")
    filtered = apply_threshold(raw, threshold)
    assert 0 < filtered.nnz < raw.nnz
    assert (filtered != direct).nnz == 0


# ---- metrics -----------------------------------------------------------------------------------------------------
def test_metrics_count_queries_without_hits_as_zero():
    qrels = {"a": {"x": 1}, "b": {"y": 1}}
    perfect = {"a": {"x": 2.0, "z": 1.0}, "b": {"y": 3.0}}
    assert evaluate_run(qrels, perfect)["ndcg@10"] == pytest.approx(1.0)
    for missing in ({"a": perfect["a"]}, {"a": perfect["a"], "b": {}}):
        metrics = evaluate_run(qrels, missing)
        assert metrics["ndcg@10"] == pytest.approx(0.5) and metrics["mrr@10"] == pytest.approx(0.5)
    # relevant doc at rank 11: outside MRR@10, inside Recall@100
    late = {"a": {f"n{i}": 100.0 - i for i in range(10)} | {"x": 1.0}, "b": {"y": 1.0}}
    metrics = evaluate_run(qrels, late)
    assert metrics["mrr@10"] == pytest.approx(0.5) and metrics["recall@100"] == pytest.approx(1.0)


@pytest.mark.parametrize("qrels, run, message", [
    ({"q": {"d\ud83d": 1}}, {"q": {"d": 1.0}}, r"^qrels: id 'd\\ud83d' is not valid text \(surrogates not allowed"),
    ({"q": {"d": 1}}, {"q": {"d": 1.0, "e\udc00": 0.5}}, r"^run: id 'e\\udc00' is not valid text"),
])
def test_metrics_refuse_ids_pytrec_eval_cannot_take(qrels, run, message):
    """pytrec_eval passes ids to C as UTF-8: a lone surrogate ended the process with a segmentation fault."""
    with pytest.raises(ValueError, match=message):
        evaluate_run(qrels, run)


def test_metrics_compare_ids_as_text_and_refuse_what_they_cannot_score():
    """An int query id scored every query 0 (the run file writes "1"); a NaN score made NDCG depend on dict order;
    a grade 1.5 was truncated to 1; a run for other queries scored 0 without a word."""
    assert evaluate_run({"1": {"d1": 1}}, {1: {"d1": 1.0}})["ndcg@10"] == 1.0
    assert evaluate_run({1: {2: 1}}, {"1": {"2": 1.0}})["ndcg@10"] == 1.0
    with pytest.raises(ValueError, match=r"run\['q1'\]\['da'\] is nan: scores must be finite"):
        evaluate_run({"q1": {"d1": 1}}, {"q1": {"da": math.nan, "db": 0.5, "d1": 1.0}})
    with pytest.raises(ValueError, match=r"run\['q1'\]\['d1'\] is None: scores must be finite"):
        evaluate_run({"q1": {"d1": 1}}, {"q1": {"d1": None}})
    with pytest.raises(ValueError, match=r"qrels\['q1'\]\['d1'\] is 1.5: relevance grades are integers"):
        evaluate_run({"q1": {"d1": 1.5}}, {"q1": {"d1": 1.0}})
    with pytest.raises(ValueError, match=r"is 2147483648: relevance grades are integers .*out of range"):  # a C int
        evaluate_run({"q1": {"d1": 2**31}}, {"q1": {"d1": 1.0}})
    with pytest.raises(ValueError, match=r"none of the run's 1 query ids is in qrels \(e.g. 'x'; qrels has e.g. 'q1'\)"):
        evaluate_run({"q1": {"d1": 1}}, {"x": {"d1": 1.0}})
    assert evaluate_run({"q1": {"d1": 1}}, {})["ndcg@10"] == 0.0  # no run at all still scores 0


def test_bm25_run_checks_k_and_query_ids(tmp_path):
    from fles1.bm25 import bm25_run, bm25_scores

    data = load_beir(write_beir(tmp_path / "plain"))
    for k in (0, -5, 2.5, True):  # 0 gave one hit, -5 and 2.5 bm25s's errors
        with pytest.raises(ValueError, match=rf"k must be an int >= 1, got {k!r}"):
            bm25_run(data, ["q1"], k=k)
    with pytest.raises(TypeError, match="got one str 'q1': wrap it in a list"):  # was KeyError: 'q'
        bm25_run(data, "q1")
    with pytest.raises(ValueError, match=r"1 query id\(s\) not in the dataset's queries, e.g. 'nope'"):
        bm25_run(data, ["q1", "nope"])
    with pytest.raises(ValueError, match="e.g. 'nope'"):
        bm25_scores(data, {"nope": ["d1"]})
    assert len(bm25_run(data, ["q1"], k=1)["q1"]) == 1


def test_bm25_drops_the_query_own_document_and_still_fills_k(tmp_path):
    """BEIR's convention (the toy corpus holds a document with the id of query q2): gone from the hits, and the
    search goes one deeper so that k are left."""
    from fles1.bm25 import bm25_run

    data = load_beir(write_beir(tmp_path / "toy"))
    assert "q2" in bm25_run(data, ["q2"], k=10, drop_self=False)["q2"]
    for k in (1, 2):
        hits = bm25_run(data, ["q2"], k=k)["q2"]
        assert "q2" not in hits and len(hits) == k


def test_a_document_reads_title_then_text(tmp_path):
    """BEIR's and sentence-transformers' order: "title text" (another order changes every document vector)."""
    data = load_beir(write_beir(tmp_path / "toy"))
    assert data.document_text("d1") == "Vitamin D Vitamin D deficiency and bone health in older adults."
    assert data.document_text("d4") == "Dietary fiber intake and colon cancer."


def test_bm25_of_a_corpus_without_an_indexable_term_has_no_hits(tmp_path):
    """bm25s's index raised 'max() arg is an empty sequence' (training with data.positive=bm25 on such a corpus)."""
    from fles1.bm25 import bm25_run

    corpus = [{"_id": "d1", "title": "", "text": ""}, {"_id": "d2", "title": "the", "text": "and of"}]
    data = load_beir(write_beir(tmp_path / "blank", corpus, [{"_id": "q1", "text": "heart"}], [("q1", "d1", 1)]))
    assert bm25_run(data, ["q1"]) == {"q1": {}}
    plain = load_beir(write_beir(tmp_path / "plain"))
    assert bm25_run(plain, ["q1"])["q1"]  # a corpus with terms still has hits


def test_bm25_scores_of_given_documents_are_the_rankings_scores(nfcorpus_dir):
    """data.positive=bm25 kept every query's full BM25 ranking (queries x documents floats) to read the scores of a
    few relevant documents; bm25_scores returns those alone, equal to the ranking's."""
    from fles1.bm25 import bm25_run, bm25_scores

    data = load_beir(nfcorpus_dir, "test")
    query_ids = sorted(data.qrels)[:40]
    wanted = {qid: sorted(data.qrels[qid]) for qid in query_ids}
    ranked = bm25_run(data, query_ids, k=len(data.corpus), drop_self=False)
    scores = bm25_scores(data, wanted)
    assert scores == {qid: {d: ranked[qid][d] for d in wanted[qid] if d in ranked[qid]} for qid in query_ids}
    assert sum(map(len, scores.values())) > 100  # most judged documents share a term with their query


def test_graded_judgements_reach_the_metrics(tmp_path):
    """Grades read from the qrels file score as trec_eval scores them (gain = grade): grades cut to 0/1 passed
    every toy test (their qrels were all grade 1)."""
    corpus = [{"_id": d, "title": "", "text": d} for d in ("d1", "d2", "d3")]
    data = load_beir(write_beir(tmp_path / "graded", corpus, [{"_id": "q1", "text": "x"}],
                                [("q1", "d1", 2), ("q1", "d2", 1)]))
    assert data.qrels == {"q1": {"d1": 2, "d2": 1}}
    metrics = evaluate_run(data.qrels, {"q1": {"d2": 3.0, "d1": 2.0, "d3": 1.0}})  # the grade-1 document first
    assert metrics["ndcg@10"] == pytest.approx((1 / 1 + 2 / math.log2(3)) / (2 / 1 + 1 / math.log2(3)))


def test_trec_run_file_round_trip(tmp_path):
    run = {"q1": {"d1": 1.25, "d2": 3.5}, "q2": {}}
    write_trec_run(run, str(tmp_path / "run.trec"), tag="t")
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert lines[0] == "q1 Q0 d2 1 3.5 t" and len(lines) == 2
    assert read_trec_run(str(tmp_path / "run.trec")) == {"q1": {"d2": 3.5, "d1": 1.25}}
    (tmp_path / "bad.trec").write_text("q1 Q0 d1 1 3.5 t\nq1 Q0 d2 2 abc t\n")
    with pytest.raises(ValueError, match=r"bad\.trec:2: score 'abc' is not a number"):
        read_trec_run(str(tmp_path / "bad.trec"))



def test_run_files_keep_small_scores_apart():
    """Scores went to the run file (and the metrics) at 6 decimals: a ranking scaled by 1e-6 -- the same ranking --
    tied its lower scores, trec_eval ordered the ties by doc id, and NDCG@10 fell 0.52 -> 0.51."""
    from fles1.metrics import rounded_run

    qrels = {"q1": {"d1": 1, "d3": 2}, "q2": {"d4": 1}}
    run = {"q1": {"d1": 0.75, "d2": 0.7500004, "d3": 0.7500009, "d4": 0.25}, "q2": {"d4": 1e-3, "d5": 1.2e-3}}
    expected = evaluate_run(qrels, run)
    for scale in (1.0, 1e-6, 1e-12):
        scaled = {qid: {did: score * scale for did, score in docs.items()} for qid, docs in run.items()}
        assert evaluate_run(qrels, rounded_run(scaled)) == expected
    assert rounded_run({"q": {"d": 0.1 + 0.2}}) == {"q": {"d": 0.3}}  # digits past float32's are noise

# ---- the pipeline --------------------------------------------------------------------------------------------------
def test_corpus_cache_is_reused_and_interrupts_leave_none(tiny_random_checkpoint, beir_dir, tmp_path, monkeypatch):
    from fles1_encoder import FLES1Encoder

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu")
    dataset, cache = load_beir(beir_dir), str(tmp_path / "cache")
    original = encoder.encode_batch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(encoder, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(encoder, dataset, cache, model_fp="m")
    assert not os.path.exists(cache) or os.listdir(cache) == []

    monkeypatch.setattr(encoder, "encode_batch", original)
    ids, first, info = encode_corpus(encoder, dataset, cache, model_fp="m")
    assert not info["cached"] and len(os.listdir(cache)) == 1 and first.shape == (len(CORPUS), 30522)
    monkeypatch.setattr(encoder, "encode_batch", interrupted)  # a cache hit must not encode
    _, second, info = encode_corpus(encoder, dataset, cache, model_fp="m")
    assert info["cached"] and (first != second).nnz == 0
    with pytest.raises(KeyboardInterrupt):  # another model fingerprint is another key
        encode_corpus(encoder, dataset, cache, model_fp="other")
    import fles1.evaluation

    monkeypatch.setattr(fles1.evaluation, "fingerprint_files", lambda paths: "edited-code")
    with pytest.raises(KeyboardInterrupt):  # so is other encoding code (modeling / encoder files)
        encode_corpus(encoder, dataset, cache, model_fp="m")
    monkeypatch.undo()
    monkeypatch.setattr(encoder, "encode_batch", interrupted)
    dataset.corpus["d1"]["text"] += " changed"
    with pytest.raises(KeyboardInterrupt):  # so is another corpus
        encode_corpus(encoder, dataset, cache, model_fp="m")


def test_corpus_cache_without_a_fingerprint_follows_the_weights(tiny_random_checkpoint, beir_dir, tmp_path):
    """encode_corpus / evaluate_dataset (public) keyed the cache "unknown" without model_fp: a model changed in
    memory (between training steps) got the old weights' document vectors back, scored against its new queries."""
    import torch

    from fles1_encoder import FLES1Encoder

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu")
    dataset, cache = load_beir(beir_dir), str(tmp_path / "cache")
    _, first, info = encode_corpus(encoder, dataset, cache)
    assert not info["cached"]
    assert encode_corpus(encoder, dataset, cache)[2]["cached"]  # the same weights: the same entry
    with torch.no_grad():
        for parameter in encoder.model.parameters():
            parameter.mul_(0.5)
    _, second, info = encode_corpus(encoder, dataset, cache)
    assert not info["cached"] and (first != second).nnz > 0
    assert len(os.listdir(cache)) == 2


def test_corpus_encoding_resumes_from_its_finished_shards(tiny_random_checkpoint, beir_dir, tmp_path, monkeypatch):
    from fles1_encoder import FLES1Encoder

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu")
    dataset, cache = load_beir(beir_dir), tmp_path / "cache"
    shards = -(-len(CORPUS) // 2)
    assert shards >= 3
    _, reference, _ = encode_corpus(encoder, dataset, None, model_fp="m", shard_docs=2)  # no cache: nothing saved
    assert reference.shape == (len(CORPUS), 30522) and not cache.exists()
    original, encoded = encoder.encode_batch, []

    def interrupted_after_one_shard(texts, **kwargs):
        if encoded:
            raise KeyboardInterrupt
        encoded.append(list(texts))
        return original(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode_batch", interrupted_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(encoder, dataset, str(cache), model_fp="m", shard_docs=2)
    (parts,) = cache.iterdir()  # the finished shard is saved, no cache entry claims the corpus
    assert parts.name.endswith(".parts") and sorted(p.name for p in parts.iterdir()) == ["000000.npz"]
    (parts / "000001.npz").write_bytes(b"not an npz")  # an unreadable shard is encoded again, not trusted

    def counted(texts, **kwargs):
        encoded.append(list(texts))
        return original(texts, **kwargs)

    encoded.clear()
    monkeypatch.setattr(encoder, "encode_batch", counted)
    ids, resumed, info = encode_corpus(encoder, dataset, str(cache), model_fp="m", shard_docs=2)
    first_shard = [dataset.document_text(doc_id) for doc_id in ids[:2]]
    assert len(encoded) == shards - 1 and first_shard not in encoded  # resumed after the saved shard
    assert (resumed != reference).nnz == 0 and not info["cached"] and info["docs_per_second"] > 0
    assert [p.name for p in cache.iterdir()] == [parts.name[: -len(".parts")] + ".npz"]  # shards folded into it
    encoded.clear()
    _, cached, info = encode_corpus(encoder, dataset, str(cache), model_fp="m", shard_docs=2)
    assert info["cached"] and not encoded and (cached != reference).nnz == 0
    with pytest.raises(ValueError, match="shard_docs must be an int >= 1, got 0"):
        encode_corpus(encoder, dataset, str(cache), model_fp="m", shard_docs=0)


def test_a_resume_at_another_batch_size_encodes_the_saved_shards_again(tiny_random_checkpoint, beir_dir, tmp_path,
                                                                       monkeypatch):
    """Shards saved at --batch-size 64 were reused by a resume at 4: docs/s, measured partly at 64, was recorded
    (and reported by every later run) as batch size 4's."""
    from fles1_encoder import FLES1Encoder

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu")
    dataset, cache = load_beir(beir_dir), tmp_path / "cache"
    original, batch_sizes = encoder.encode_batch, []

    def interrupted_after_one_shard(texts, **kwargs):
        if batch_sizes:
            raise KeyboardInterrupt
        batch_sizes.append(kwargs["batch_size"])
        return original(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode_batch", interrupted_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(encoder, dataset, str(cache), model_fp="m", shard_docs=2, batch_size=64)

    def counted(texts, **kwargs):
        batch_sizes.append(kwargs["batch_size"])
        return original(texts, **kwargs)

    batch_sizes.clear()
    monkeypatch.setattr(encoder, "encode_batch", counted)
    _, _, info = encode_corpus(encoder, dataset, str(cache), model_fp="m", shard_docs=2, batch_size=4)
    assert batch_sizes == [4] * -(-len(CORPUS) // 2) and info["batch_size"] == 4  # every shard, at 4

SHARED_KEYS = {
    "top": {"model", "threshold", "query_max_length", "document_max_length", "environment", "datasets"},
    "dataset": {"split", "num_queries", "num_docs", "data_fingerprint", "data_source", "metrics", "bm25", "production"},
    "metrics": {"ndcg@10", "mrr@10", "recall@100", "map@100", "recall@1000", "nnz_doc", "nnz_query"},
    "production": {"docs_per_second", "query_latency_ms_p50", "query_latency_ms_p95", "index_bytes_per_1k_docs",
                   "index_ratio_to_dense_768", "docs_per_second_from_cache", "docs_per_second_batch_size",
                   "docs_per_second_device", "docs_per_second_encoded_at", "query_latency_queries"},
}


def test_cli_writes_shared_format_run_files_and_zero_shot_table(tiny_random_checkpoint, tmp_path):
    first = write_beir(tmp_path / "toy")
    second = write_beir(tmp_path / "other" / "toy2", qrels=[("q1", "d1", 1), ("q4", "d3", 1)])
    output, markdown = tmp_path / "out" / "results.json", tmp_path / "out" / "card.md"
    argv = ["--model", tiny_random_checkpoint, "--data", first, second, "--threshold", "0", "--output", str(output),
            "--run-file", str(tmp_path / "out" / "run.trec"), "--markdown", str(markdown),
            "--cache-dir", str(tmp_path / "cache"), "--latency-queries", "3", "--export", str(tmp_path / "export")]
    assert eval_fles1.main(argv) == 0
    results = json.loads(output.read_text())
    assert set(results) == SHARED_KEYS["top"]
    assert set(results["model"]) == {"path", "fingerprint", "tokenizer_fingerprint"}
    assert set(results["environment"]) == {"packages", "device", "python"}
    assert results["threshold"] == 0 and results["document_max_length"] == 48
    assert list(results["datasets"]) == ["toy", "toy2"]
    for name, entry in results["datasets"].items():
        assert set(entry) == SHARED_KEYS["dataset"] and set(entry["metrics"]) == SHARED_KEYS["metrics"]
        assert set(entry["production"]) == SHARED_KEYS["production"]
        assert set(entry["bm25"]) == {"library", "metrics"}
        assert set(entry["bm25"]["metrics"]) == SHARED_KEYS["metrics"] - {"nnz_doc", "nnz_query"}
        run = read_trec_run(str(tmp_path / "out" / f"run.{name}.trec"))
        dataset = load_beir(first if name == "toy" else second)
        assert evaluate_run(dataset.qrels, run) == pytest.approx(
            {key: entry["metrics"][key] for key in entry["bm25"]["metrics"]}, abs=1e-12
        )
    toy = results["datasets"]["toy"]
    assert toy["num_queries"] == 4 and toy["num_docs"] == len(CORPUS)
    assert toy["data_source"] == "local folder"  # the card lists only Hub datasets as such
    run = read_trec_run(str(tmp_path / "out" / "run.toy.trec"))
    assert "q3" not in run  # blank query: no hits, yet counted in num_queries (it scores 0)
    assert "q2" not in run["q2"]  # the doc sharing the query's id is dropped
    table = markdown.read_text()
    assert "| toy |" in table and "| toy2 |" in table and "| **Average** |" in table
    assert table == markdown_tables(results)
    assert os.path.isfile(tmp_path / "export" / "toy2" / "pyserini" / "collection" / "docs.jsonl")
    # a warm rerun at another batch size reports the docs/s of the run that encoded the corpus, and says so
    assert toy["production"]["docs_per_second_from_cache"] is False
    assert toy["production"]["docs_per_second_batch_size"] == 32
    rerun = tmp_path / "out" / "rerun.json"
    assert eval_fles1.main(["--model", tiny_random_checkpoint, "--data", first, "--threshold", "0", "--no-bm25",
                            "--cache-dir", str(tmp_path / "cache"), "--latency-queries", "3", "--batch-size", "2",
                            "--output", str(rerun)]) == 0
    warm = json.loads(rerun.read_text())["datasets"]["toy"]["production"]
    assert warm["docs_per_second"] == toy["production"]["docs_per_second"]
    assert warm["docs_per_second_from_cache"] is True and warm["docs_per_second_batch_size"] == 32
    # and where and when it was measured (the card's note names them): that run's device, threads included
    assert warm["docs_per_second_device"] == toy["production"]["docs_per_second_device"] == results["environment"]["device"]
    assert warm["docs_per_second_encoded_at"] == toy["production"]["docs_per_second_encoded_at"]
    assert f"| {warm['docs_per_second']:.1f}* |" in markdown_tables(json.loads(rerun.read_text()))
    assert "BM25: bm25s)" in table and "BM25: not run)" in markdown_tables(json.loads(rerun.read_text()))  # --no-bm25


def test_cli_index_dir_is_written_without_production_numbers(tiny_random_checkpoint, beir_dir, tmp_path):
    """--index-dir with --no-production wrote nothing (the index was saved only to measure its size)."""
    argv = ["--model", tiny_random_checkpoint, "--data", beir_dir, "--threshold", "0", "--no-production", "--no-bm25",
            "--cache-dir", str(tmp_path / "cache"), "--index-dir", str(tmp_path / "index")]
    assert eval_fles1.main(argv) == 0
    loaded = InvertedIndex.load(str(tmp_path / "index" / "toy.index.npz"))
    assert loaded.num_docs == len(CORPUS)


def test_cli_refuses_two_outputs_on_one_path(tiny_random_checkpoint, beir_dir, tmp_path, capsys):
    """--output and --markdown on one path exited 0 with only the Markdown there: the results JSON was lost."""
    same = str(tmp_path / "same.out")
    for first, second in (("--output", "--markdown"), ("--output", "--run-file"), ("--markdown", "--run-file")):
        argv = ["--model", tiny_random_checkpoint, "--data", beir_dir, first, same, second,
                os.path.join(str(tmp_path), ".", "same.out")]
        assert eval_fles1.main(argv) == 2
        assert f"error: {second} {tmp_path}/./same.out is the file {first} writes too" in capsys.readouterr().err
    assert not os.path.exists(same)
    for flag, kind in (("--output", "file"), ("--markdown", "file"), ("--run-file", "file"),
                       ("--index-dir", "folder"), ("--export", "folder")):  # an unset $OUT: exit 0, nothing written
        assert eval_fles1.main(["--model", tiny_random_checkpoint, "--data", beir_dir, flag, ""]) == 2
        assert capsys.readouterr().err.endswith(f"error: {flag} is empty: name a {kind}\n")



def test_cli_refuses_an_output_on_a_datasets_run_file(tiny_random_checkpoint, tmp_path, capsys):
    """With several datasets the run files are run.<name>.trec: --output run.two.trec exited 0 with the results
    JSON in place of dataset two's run (the flags' own paths all differed)."""
    for name in ("one", "two"):
        write_beir(tmp_path / name)
    run_file, output = tmp_path / "runs" / "run.trec", tmp_path / "runs" / "run.two.trec"
    base = ["--model", tiny_random_checkpoint, "--data", str(tmp_path / "one"), str(tmp_path / "two"),
            "--no-cache", "--no-bm25", "--no-production", "--run-file", str(run_file)]
    for flag in ("--output", "--markdown"):
        assert eval_fles1.main(base + [flag, str(output)]) == 2
        assert f"error: {flag} {output} is the file the run file of two is written to" in capsys.readouterr().err
        assert not output.exists()
    index = tmp_path / "index"
    assert eval_fles1.main(base[:-2] + ["--index-dir", str(index), "--output", str(index / "one.index.npz")]) == 2
    assert "is the file the index of one is written to" in capsys.readouterr().err
    exported = tmp_path / "exported"  # the export replaces DIR/<dataset>/pyserini and elasticsearch whole
    for flag, path, folder in (("--run-file", exported / "two" / "pyserini" / "run.trec", "two/pyserini"),
                               ("--index-dir", exported / "one" / "elasticsearch" / "indices", "one/elasticsearch"),
                               ("--cache-dir", exported / "one" / "pyserini", "one/pyserini")):
        argv = [arg for arg in base if arg != "--no-cache"][:-2] + ["--export", str(exported), flag, str(path)]
        assert eval_fles1.main(argv) == 2
        assert f"lies in {exported}/{folder}, which the {folder[4:]} export of {folder[:3]} replaces" in \
            capsys.readouterr().err
    for flag in ("--output", "--markdown"):  # the export's dataset folder itself: after the whole run, a traceback
        argv = base[:-2] + ["--export", str(exported), flag, str(exported / "one")]  # or the results lost
        assert eval_fles1.main(argv) == 2
        assert f"would hold {exported}/one/elasticsearch, which the elasticsearch export" in capsys.readouterr().err
    assert not exported.exists()
    assert eval_fles1.main(base + ["--output", str(tmp_path / "results.json")]) == 0  # apart: both written
    assert output.read_text().startswith("q") and json.loads((tmp_path / "results.json").read_text())["datasets"]


def test_dataset_named_after_its_folder_when_given_as_dot_or_dot_dot(tiny_random_checkpoint, beir_dir, tmp_path,
                                                                      monkeypatch):
    """`--data ..` named the dataset "..": `--export DIR` then wrote DIR/../elasticsearch, replacing a sibling
    folder of that name, and the results were keyed ".."."""
    sibling = tmp_path / "mine" / "elasticsearch"
    sibling.mkdir(parents=True)
    (sibling / "keep.txt").write_text("not an export")
    exports = tmp_path / "mine" / "exports"
    monkeypatch.chdir(os.path.join(beir_dir, "qrels"))
    assert load_beir("..").name == "toy"
    monkeypatch.chdir(beir_dir)
    assert load_beir(".").name == "toy"
    monkeypatch.chdir(os.path.join(beir_dir, "qrels"))
    argv = ["--model", tiny_random_checkpoint, "--data", "..", "--threshold", "0", "--no-production", "--no-bm25",
            "--no-cache", "--export", str(exports), "--output", str(tmp_path / "r.json")]
    assert eval_fles1.main(argv) == 0
    assert (sibling / "keep.txt").read_text() == "not an export"
    assert sorted(os.listdir(exports / "toy")) == ["elasticsearch", "pyserini"]
    assert list(json.load(open(tmp_path / "r.json"))["datasets"]) == ["toy"]


def test_cli_default_threshold_is_the_models(tiny_random_checkpoint, beir_dir, tmp_path):
    """The CLI evaluated at 0.3 whatever the model's config.inference_threshold (what FLES1Encoder applies)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_random_checkpoint, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "inference_threshold": 0.5}))
    output = tmp_path / "results.json"
    argv = ["--model", str(model), "--data", beir_dir, "--no-production", "--no-bm25", "--no-cache",
            "--output", str(output)]
    assert eval_fles1.main(argv) == 0
    assert json.loads(output.read_text())["threshold"] == 0.5


def test_judged_documents_missing_from_the_corpus_can_stay_judged(tiny_random_checkpoint, tmp_path, monkeypatch):
    """Such a line always stopped the evaluation, so BEIR's ArguAna (whose test qrels judge a document its corpus
    lacks) could not be evaluated. With --keep-missing-docs it stays judged, as in BEIR and pytrec_eval: a relevant
    document no run retrieves, in the recall denominator; warned about, counted in the output."""
    from fles1.beir import BEIRDataWarning

    extra = [("q1", "gone", 1), ("q4", "gone-too", 0)]
    folder = write_beir(tmp_path / "missing", qrels=QRELS + extra)
    with pytest.warns(BEIRDataWarning, match=r"test\.tsv:7: corpus id 'gone' is not in corpus\.jsonl \(2 judgements"):
        data = load_beir(folder, keep_missing_documents=True)
    assert data.qrels["q1"] == {"d1": 1, "gone": 1} and data.missing_documents == [("q1", "gone"), ("q4", "gone-too")]
    output = tmp_path / "results.json"
    with pytest.warns(BEIRDataWarning):
        assert eval_fles1.main(["--model", tiny_random_checkpoint, "--data", folder, "--threshold", "0", "--no-cache",
                                "--no-bm25", "--no-production", "--keep-missing-docs", "--output", str(output)]) == 0
    assert json.loads(output.read_text())["datasets"]["missing"]["judged_documents_missing"] == 2
    run = {"q1": {"d1": 1.0}}  # d1 found, "gone" cannot be: recall 1/2, as pytrec_eval counts it
    assert evaluate_run({"q1": data.qrels["q1"]}, run)["recall@100"] == 0.5
    _fake_hub(monkeypatch, [{"query-id": q, "corpus-id": d, "score": s} for q, d, s in QRELS + extra])
    with pytest.warns(BEIRDataWarning, match=r"BeIR/toy-qrels test row 5: corpus id 'gone' is not in BeIR/toy corpus"):
        assert load_beir("BeIR/toy", keep_missing_documents=True).missing_documents == data.missing_documents


def test_evaluate_threshold_reduces_nnz(tiny_random_checkpoint, beir_dir, tmp_path):
    cache = str(tmp_path / "cache")
    low = evaluate(tiny_random_checkpoint, [beir_dir], threshold=0, cache_dir=cache, bm25=False, production=False,
                   log=lambda *_: None)
    high = evaluate(tiny_random_checkpoint, [beir_dir], threshold=0.5, cache_dir=cache, bm25=False, production=False,
                    log=lambda *_: None)
    low, high = low["datasets"]["toy"]["metrics"], high["datasets"]["toy"]["metrics"]
    assert high["nnz_doc"] < low["nnz_doc"] and high["nnz_query"] <= low["nnz_query"]


def test_evaluate_takes_paths_as_strings_and_refuses_one_dataset_not_in_a_list(tiny_random_checkpoint, beir_dir,
                                                                               tmp_path):
    """A pathlib.Path model was a TypeError when the results were written, after the encoding (an export_dir one
    left an empty export folder); one string for `data` was taken a character at a time ("." the cwd)."""
    from pathlib import Path

    from fles1.evaluation import write_results

    with pytest.raises(TypeError, match=r"data must be a list of BEIR folders or hub ids, got one str: "
                                        r"evaluate\(model, \['"):
        evaluate(tiny_random_checkpoint, beir_dir, cache_dir=None, bm25=False, production=False)
    results = evaluate(Path(tiny_random_checkpoint), [Path(beir_dir)], cache_dir=Path(tmp_path / "cache"), bm25=False,
                       production=False, run_file=Path(tmp_path / "run.trec"), export_dir=Path(tmp_path / "export"),
                       log=lambda *_: None)
    assert results["model"]["path"] == tiny_random_checkpoint
    write_results(results, str(tmp_path / "results.json"))
    assert json.load(open(tmp_path / "results.json"))["datasets"]["toy"]["metrics"] == \
        results["datasets"]["toy"]["metrics"]
    assert (tmp_path / "run.trec").is_file() and (tmp_path / "export" / "toy" / "elasticsearch").is_dir()


def test_evaluation_cuts_the_queries_at_the_threshold_too(tiny_random_checkpoint, beir_dir):
    """Queries and documents alike: the random model's query weights are all small, so a cut at their median
    (not 0.5) is what shows a query vector kept below the threshold."""
    from fles1.evaluation import evaluate_dataset
    from fles1_encoder import FLES1Encoder

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint)
    data = load_beir(beir_dir)
    raw = evaluate_dataset(encoder, data, 0.0, cache_dir=None, bm25=False, production=False)[2]["query_matrix"]
    cut = float(np.median(raw.data))
    queries = evaluate_dataset(encoder, data, cut, cache_dir=None, bm25=False, production=False)[2]["query_matrix"]
    assert 0 < queries.nnz < raw.nnz and queries.data.min() >= cut


def test_the_corpus_cache_is_keyed_by_the_document_max_length(tiny_random_checkpoint, beir_dir, tmp_path):
    """Vectors of documents cut at another length are other vectors: never reused."""
    from fles1_encoder import FLES1Encoder

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint)
    data, cache = load_beir(beir_dir), str(tmp_path / "cache")
    assert encode_corpus(encoder, data, cache)[2]["cached"] is False
    assert encode_corpus(encoder, data, cache)[2]["cached"] is True
    encoder.model.config.document_max_length = 4
    assert encoder.max_lengths["document"] == 4
    assert encode_corpus(encoder, data, cache)[2]["cached"] is False


def test_the_corpus_cache_is_keyed_by_the_models_dtype(tiny_random_checkpoint, beir_dir, tmp_path):
    """A folder loaded in bf16 (dtype=) has the float32 folder's fingerprint: it got the float32 vectors."""
    import torch

    from fles1.evaluation import model_fingerprint
    from fles1_encoder import FLES1Encoder

    data, cache = load_beir(beir_dir), str(tmp_path / "cache")
    fingerprint = model_fingerprint(tiny_random_checkpoint)
    float32 = encode_corpus(FLES1Encoder.from_pretrained(tiny_random_checkpoint), data, cache, fingerprint)
    assert float32[2]["cached"] is False
    half = FLES1Encoder.from_pretrained(tiny_random_checkpoint, dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16
    bf16 = encode_corpus(half, data, cache, fingerprint)
    assert bf16[2]["cached"] is False and abs(bf16[1] - float32[1]).max() > 0
    assert encode_corpus(half, data, cache, fingerprint)[2]["cached"] is True
    assert encode_corpus(FLES1Encoder.from_pretrained(tiny_random_checkpoint), data, cache, fingerprint)[2]["cached"]
    # nor the projection's dtype (a float32 model projecting in bf16)
    projected = FLES1Encoder.from_pretrained(tiny_random_checkpoint, projection_dtype=torch.bfloat16)
    assert encode_corpus(projected, data, cache, fingerprint)[2]["cached"] is False


@pytest.mark.parametrize("score, message", [
    ("0.5", r"test\.tsv:2: score '0\.5' is not an integer relevance grade"),  # was truncated to 0: not relevant
    ("inf", r"test\.tsv:2: score 'inf' is not an integer relevance grade"),  # was an OverflowError traceback
    # pytrec_eval holds grades in a C int: these loaded, then pytrec_eval failed with a SystemError after encoding
    ("9223372036854775808", r"test\.tsv:2: score '9223372036854775808' is out of range for a relevance grade"),
    ("1e300", r"test\.tsv:2: score '1e300' is out of range"), ("2147483648", r"score '2147483648' is out of range"),
])
def test_qrels_scores_are_integer_grades(tmp_path, score, message):
    folder = write_beir(tmp_path / "graded", qrels=[("q1", "d1", score)] + QRELS[1:])
    with pytest.raises(BEIRDataError, match=message):
        load_beir(folder)
    assert load_beir(write_beir(tmp_path / "float", qrels=[("q1", "d1", "1.0")] + QRELS[1:])).qrels["q1"] == {"d1": 1}


def test_qrels_with_a_header_alone_fail_before_any_encoding(tmp_path):
    """Found only after the dataset's corpus was encoded, by a message naming no file."""
    with pytest.raises(BEIRDataError, match=r"qrels/test\.tsv: no judgements"):
        load_beir(write_beir(tmp_path / "none", qrels=[]))


def test_repeated_dataset_names_never_take_another_datasets_name(tmp_path):
    """Folders nf, nf, nf-2 were named nf, nf-2, nf-2: one dataset's results, run file and export replaced
    another's."""
    from fles1.evaluation import dataset_names

    datasets = [load_beir(write_beir(tmp_path / where / name)) for where, name in (("a", "nf"), ("b", "nf"),
                                                                                    ("c", "nf-2"))]
    assert dataset_names(datasets) == ["nf", "nf-3", "nf-2"]


def test_ids_the_outputs_cannot_carry_fail_before_the_encoding(tiny_random_checkpoint, tmp_path, monkeypatch):
    """A TREC run line is split on whitespace ("PLAIN 2 Q0 MED 10 ..."); Elasticsearch refuses an _id over 512
    bytes. Both were written anyway, after the whole evaluation."""
    import fles1.evaluation

    monkeypatch.setattr(fles1.evaluation, "encode_corpus", lambda *a, **k: pytest.fail("encoded first"))
    spaced = write_beir(tmp_path / "spaced", corpus=CORPUS + [{"_id": "MED 10", "text": "x"}])
    with pytest.raises(ValueError, match=r"spaced: corpus id 'MED 10' cannot go into a TREC run file"):
        evaluate(tiny_random_checkpoint, [spaced], run_file=str(tmp_path / "run.trec"), cache_dir=None)
    # Anserini's runs from the Pyserini export are TREC runs too (was exported, the runs then broken)
    with pytest.raises(ValueError, match=r"spaced: corpus id 'MED 10' cannot go .* or leave out --export"):
        evaluate(tiny_random_checkpoint, [spaced], export_dir=str(tmp_path / "export"), cache_dir=None)
    long_id = "d" * 600
    long = write_beir(tmp_path / "long", corpus=CORPUS + [{"_id": long_id, "text": "x"}])
    with pytest.raises(ValueError, match=r"long: corpus id 'd{40}'\.\.\. is 600 bytes; an Elasticsearch/OpenSearch"):
        evaluate(tiny_random_checkpoint, [long], export_dir=str(tmp_path / "export"), cache_dir=None)
    with pytest.raises(ValueError, match=r"query id 'PLAIN 2' cannot go into a TREC run file"):
        write_trec_run({"PLAIN 2": {"d1": 1.0}}, str(tmp_path / "direct.trec"))
    assert not (tmp_path / "direct.trec").exists()


def test_corpus_cache_is_not_reused_for_another_tokenizer(tiny_random_checkpoint, beir_dir, tmp_path, monkeypatch):
    """The key covered the weights and the code, not the tokenizer: documents stayed encoded by the old one."""
    from fles1_encoder import FLES1Encoder

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu")
    dataset, cache = load_beir(beir_dir), str(tmp_path / "cache")
    encode_corpus(encoder, dataset, cache, model_fp="m")
    monkeypatch.setattr(encoder, "encode_batch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert encode_corpus(encoder, dataset, cache, model_fp="m")[2]["cached"]
    encoder.tokenizer.backend_tokenizer.normalizer = __import__("tokenizers").normalizers.BertNormalizer(
        lowercase=False)
    with pytest.raises(KeyboardInterrupt):  # not a cache hit: the documents are encoded again
        encode_corpus(encoder, dataset, cache, model_fp="m")
    monkeypatch.setattr(encoder.tokenizer, "truncation_side", "left")
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(encoder, dataset, cache, model_fp="m")


def test_a_corrupt_cache_entry_is_encoded_again(tiny_random_checkpoint, beir_dir, tmp_path):
    """A truncated entry (a full disk, a copy cut short) was a BadZipFile traceback naming no file, on every run."""
    from fles1_encoder import FLES1Encoder

    encoder = FLES1Encoder.from_pretrained(tiny_random_checkpoint, device="cpu")
    dataset, cache = load_beir(beir_dir), tmp_path / "cache"
    _, reference, _ = encode_corpus(encoder, dataset, str(cache), model_fp="m")
    (entry,) = cache.iterdir()
    readable = entry.read_bytes()
    # cut short; empty (np.load's EOFError was a traceback, on every run); a plain .npy array (TypeError)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    for damaged in (readable[: len(readable) // 2], b"", buffer.getvalue()):
        entry.write_bytes(damaged)
        with pytest.warns(UserWarning, match=rf"{entry.name}: unreadable corpus cache entry"):
            _, again, info = encode_corpus(encoder, dataset, str(cache), model_fp="m")
        assert not info["cached"] and (again != reference).nnz == 0
        assert [p.name for p in cache.iterdir()] == [entry.name]  # replaced by a readable one
        assert encode_corpus(encoder, dataset, str(cache), model_fp="m")[2]["cached"]


def test_the_corpus_key_tells_apart_corpora_whose_records_join_alike():
    """Records "id<TAB>text<NEWLINE>" back to back: a text holding "<NEWLINE>d2<TAB>" hashed like the same characters
    moved into the next document, and the second corpus was scored with the first one's cached vectors."""
    from fles1.beir import BEIRDataset
    from fles1.evaluation import corpus_fingerprint

    def corpus(first, second):
        return BEIRDataset(name="c", corpus={"d1": {"title": "", "text": first}, "d2": {"title": "", "text": second}},
                           queries={}, qrels={}, split="test", fingerprint="f")

    assert corpus_fingerprint(corpus("x\nd2\ty", "z")) != corpus_fingerprint(corpus("x", "y\nd2\tz"))
    assert corpus_fingerprint(corpus("x", "y")) == corpus_fingerprint(corpus("x", "y"))


def test_gzipped_beir_files_read_the_same(tmp_path):
    """corpus.jsonl.gz / queries.jsonl.gz, as the BeIR hub repos store them, were 'corpus.jsonl: file not found'."""
    import gzip

    plain = load_beir(write_beir(tmp_path / "plain"))
    folder = write_beir(tmp_path / "gz")
    for name in ("corpus.jsonl", "queries.jsonl"):
        path = os.path.join(folder, name)
        with open(path, "rb") as source, gzip.open(path + ".gz", "wb") as target:
            target.write(source.read())
        os.remove(path)
    zipped = load_beir(folder)
    assert (zipped.corpus, zipped.queries, zipped.qrels) == (plain.corpus, plain.queries, plain.qrels)
    with open(os.path.join(folder, "queries.jsonl.gz"), "wb") as handle:
        handle.write(gzip.compress(b'{"_id": "q1", "text": "ok"}\n{"_id": \n'))
    with pytest.raises(BEIRDataError, match=r"queries\.jsonl\.gz:2: malformed JSON"):
        load_beir(folder)
    with open(os.path.join(folder, "queries.jsonl.gz"), "wb") as handle:  # a download cut short
        handle.write(gzip.compress(b'{"_id": "q1", "text": "ok"}\n' * 50)[:40])
    with pytest.raises(BEIRDataError, match=r"queries\.jsonl\.gz: not a readable gzip file"):
        load_beir(folder)


def _fake_hub(monkeypatch, qrels_rows, corpus=CORPUS, queries=QUERIES):
    import fles1.beir

    tables = {"corpus": corpus, "queries": queries}
    monkeypatch.setattr(fles1.beir, "_load_from_hub", lambda name, config=None, split=None: (
        qrels_rows if name.endswith("-qrels") else tables[config]))


def test_hub_datasets_get_the_checks_a_folder_gets(tmp_path, monkeypatch):
    """Hub rows skipped every qrels check: a 0.5 grade became 0, an unknown query id a KeyError after the whole
    corpus was encoded."""
    rows = [{"query-id": q, "corpus-id": d, "score": s} for q, d, s in QRELS]
    _fake_hub(monkeypatch, rows)
    hub, local = load_beir("BeIR/toy"), load_beir(write_beir(tmp_path / "toy"))
    assert (hub.corpus, hub.queries, hub.qrels) == (local.corpus, local.queries, local.qrels)
    assert (hub.hub_id, local.hub_id) == ("BeIR/toy", "")
    for bad, message in [
        ({"query-id": "q1", "corpus-id": "d1", "score": 0.5}, r"BeIR/toy-qrels test row 5: score 0\.5 is not an integer"),
        ({"query-id": "q9", "corpus-id": "d1", "score": 1}, r"row 5: query id 'q9' is not in BeIR/toy queries"),
        ({"query-id": "q1", "corpus-id": "d9", "score": 1}, r"row 5: corpus id 'd9' is not in BeIR/toy corpus"),
        ({"query-id": "q1", "corpus-id": "d1", "score": 2}, r"row 5: \('q1', 'd1'\) judged again with another score"),
    ]:
        _fake_hub(monkeypatch, rows + [bad])
        with pytest.raises(BEIRDataError, match=message):
            load_beir("BeIR/toy")
    _fake_hub(monkeypatch, rows, corpus=CORPUS + [{"_id": "d1", "title": "", "text": "another text"}])
    with pytest.raises(BEIRDataError, match=r"BeIR/toy corpus row 6: _id 'd1' again, with another text \(first at row 0"):
        load_beir("BeIR/toy")
    _fake_hub(monkeypatch, rows, corpus=CORPUS + [{"_id": "d9", "title": 3, "text": ""}])
    with pytest.raises(BEIRDataError, match=r"BeIR/toy corpus row 6: 'title' is int, expected a string"):
        load_beir("BeIR/toy")
    _fake_hub(monkeypatch, [])
    with pytest.raises(BEIRDataError, match=r"BeIR/toy-qrels test: no judgements"):
        load_beir("BeIR/toy")


def test_eval_markdown_tables_escape_dataset_names():
    """A dataset folder named `a|b` split its row of eval's own tables (the card's escaped it already)."""
    from fles1.metrics import METRIC_KEYS

    metrics = {key: 0.5 for key in METRIC_KEYS} | {"nnz_doc": 100.0, "nnz_query": 10.0}
    production = {"docs_per_second": 10.0, "query_latency_ms_p50": 1.0, "query_latency_ms_p95": 2.0,
                  "index_bytes_per_1k_docs": 1e6, "index_ratio_to_dense_768": 0.5}
    results = {"threshold": 0.3, "document_max_length": 256, "environment": {"device": "cpu"},
               "datasets": {"a|b_c": {"split": "test", "metrics": metrics, "bm25": None, "production": production}}}
    rows = [line for line in markdown_tables(results).splitlines() if line.startswith("| a")]
    assert len(rows) == 2 and all(row.startswith("| a\\|b\\_c |") for row in rows)



def test_a_hub_dataset_without_the_split_says_so_and_training_asks_a_hub_id_for_its_dev_split(tmp_path, monkeypatch):
    """datasets' "Unknown split" was reported as a failure to load the dataset (it had loaded, from the cache);
    train --eval-dev skipped dev evaluation of every hub dataset ("no BEIR dev split": it looked for qrels/dev.tsv
    in a folder of that name)."""
    import datasets

    import fles1.beir
    from fles1.beir import BEIRSplitError
    from fles1.training.run import check_dev_data

    def only_test(name, *args, split=None, **kwargs):
        raise ValueError("Unknown split \"dev\". Should be one of ['test'].")

    monkeypatch.setattr(datasets, "load_dataset", only_test)
    with pytest.raises(BEIRSplitError) as error:
        fles1.beir._load_from_hub("BeIR/toy-qrels", split="dev")
    assert str(error.value) == "BeIR/toy-qrels: no split 'dev' (Unknown split \"dev\". Should be one of ['test'].)"
    rows = [{"query-id": q, "corpus-id": d, "score": s} for q, d, s in QRELS]
    _fake_hub(monkeypatch, rows)
    assert check_dev_data("BeIR/toy") is None  # it has one: dev evaluation runs
    tables = {"corpus": CORPUS, "queries": QUERIES}

    def without_dev(name, config=None, split=None):
        if name.endswith("-qrels") and split == "dev":
            raise BEIRSplitError(f"{name}: no split 'dev' (splits: test)")
        return rows if name.endswith("-qrels") else tables[config]

    monkeypatch.setattr(fles1.beir, "_load_from_hub", without_dev)
    assert check_dev_data("BeIR/toy") == "BeIR/toy-qrels: no split 'dev' (splits: test); dev evaluation skipped"
    folder = write_beir(tmp_path / "toy")  # test qrels only
    assert check_dev_data(folder) == f"{folder}: no BEIR dev split (qrels/dev.tsv); dev evaluation skipped"


def test_a_hub_models_fingerprint_reads_its_shards(tiny_random_checkpoint, tmp_path, monkeypatch):
    """eval --model <hub id> asked the Hub for model.safetensors, which a sharded repo does not have: a traceback
    after FLES1Encoder had loaded the shards."""
    import huggingface_hub.constants

    from conftest import sharded_copy
    from fles1.evaluation import model_fingerprint

    sharded = sharded_copy(tiny_random_checkpoint, tmp_path / "sharded")
    snapshot = tmp_path / "hub" / "models--org--fles1-sharded" / "snapshots" / ("c" * 40)
    shutil.copytree(sharded, snapshot)
    (tmp_path / "hub" / "models--org--fles1-sharded" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--fles1-sharded" / "refs" / "main").write_text("c" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the cache answers
    assert model_fingerprint("org/fles1-sharded") == model_fingerprint(sharded)


def test_the_device_label_names_a_gpus_model(monkeypatch):
    """GPU numbers were labelled "cuda:0" alone: an H200's docs/s could not be told from a T4's."""
    import torch

    from fles1.evaluation import device_label

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert device_label("cuda:0") == "cuda:0 (NVIDIA H200)"
    monkeypatch.setattr("fles1.evaluation.cpu_model", lambda: None)
    assert device_label("cpu") == f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def test_the_device_label_names_the_cpus_model(monkeypatch):
    """CPU numbers were labelled "cpu (2 cores, ...)" alone: a query's latency on this project's AMD EPYC and on an
    Intel Xeon VM differ ~2x, and the card and benchmarks could not tell which one measured."""
    import torch

    from fles1.evaluation import cpu_model, device_label

    monkeypatch.setattr("fles1.evaluation.cpu_model", lambda: "AMD EPYC 9B14")
    assert device_label("cpu") == f"cpu (AMD EPYC 9B14, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")] \
        if os.path.exists("/proc/cpuinfo") else []
    if names:  # Linux x86: the kernel's own name, spaces collapsed
        assert cpu_model() == " ".join(names[0].split())


def test_trec_order_breaks_ties_by_doc_id_descending_as_trec_eval_does(tmp_path):
    """Flipping the tie order passed every test: MRR@10's cut and the run files' ranks would differ from trec_eval's."""
    from fles1.metrics import per_query_metrics, trec_order

    assert trec_order({"a": 1.0, "b": 1.0, "c": 2.0}) == [("c", 2.0), ("b", 1.0), ("a", 1.0)]
    run = {"q": {f"d{i:02d}": 1.0 for i in range(12)}}  # all tied: trec_eval ranks d11 first, d00 last
    assert per_query_metrics({"q": {"d11": 1}}, run)["q"]["mrr@10"] == 1.0
    assert per_query_metrics({"q": {"d01": 1}}, run)["q"]["mrr@10"] == 0.0  # 11th: outside the cut
    write_trec_run(run, str(tmp_path / "run.trec"))
    assert open(tmp_path / "run.trec").readline().split()[2] == "d11"


def test_to_run_keeps_exactly_k_hits_of_a_query_that_is_no_document():
    docs = csr_matrix(np.array([[4.0], [3.0], [2.0], [1.0]], dtype=np.float32))
    index = InvertedIndex(docs, ["a", "b", "c", "d"])
    run = index.to_run(["q"], index.search(csr_matrix(np.array([[1.0]], dtype=np.float32)), k=4), k=3)
    assert run == {"q": {"a": 4.0, "b": 3.0, "c": 2.0}}


def test_search_in_several_query_chunks_keeps_every_query():
    """Queries are scored query_chunk_size (256) at a time: a chunk cut one short dropped queries past the first
    256 without a word (the toy tests never reach a second chunk)."""
    docs = sparse_random(60, 40, density=0.2, format="csr", dtype=np.float32, random_state=5)
    queries = sparse_random(7, 40, density=0.2, format="csr", dtype=np.float32, random_state=6)
    index = InvertedIndex(docs, [f"d{i}" for i in range(60)])
    alone = [index.search(queries[row], k=5)[0] for row in range(7)]
    index.query_chunk_size = 3  # chunks of 3, 3 and 1 queries
    chunked = index.search(queries, k=5)
    assert len(chunked) == 7
    for (positions, scores), (want_positions, want_scores) in zip(chunked, alone):
        assert positions.tolist() == want_positions.tolist() and scores.tolist() == want_scores.tolist()


def test_saved_index_round_trip_with_a_vocabulary_past_65536_terms(tmp_path):
    """Term ids are saved as uint16 below 65,536 terms only: a larger vocabulary (XLM-R's 250k) saved them wrapped,
    and the loaded index searched other terms' posting lists."""
    vocab_size = 70_000
    docs = csr_matrix((np.array([1.0, 2.0, 3.0], dtype=np.float32), np.array([5, 65_540, 69_999]),
                       np.array([0, 1, 2, 3])), shape=(3, vocab_size))
    index = InvertedIndex(docs, ["a", "b", "c"])
    index.save(str(tmp_path / "index.npz"))
    loaded = InvertedIndex.load(str(tmp_path / "index.npz"))
    assert (loaded.doc_matrix() != index.doc_matrix()).nnz == 0
    query = csr_matrix(([1.0], ([0], [69_999])), shape=(1, vocab_size), dtype=np.float32)
    assert loaded.to_run(["q"], loaded.search(query, k=3)) == {"q": {"c": 3.0}}


def test_bm25_hits_share_a_term_with_the_query(tmp_path):
    """bm25s fills its top-k with documents of score 0 when fewer match: those are no hits (they inflated BM25's
    recall with arbitrary documents)."""
    from fles1.bm25 import bm25_run

    data = load_beir(write_beir(tmp_path / "toy"))
    run = bm25_run(data, ["q1", "q2", "q4"], k=10)
    assert all(score > 0 for hits in run.values() for score in hits.values())
    assert list(run["q1"]) == ["d1"]  # "vitamin D bones": only d1 holds vitamin or bone


def test_bm25_keeps_k_hits_and_reads_titles(tmp_path):
    """k hits, not the k + 1 searched for a possible self-hit; a word found only in a document's title matches it
    (BEIR's "title text", as the encoder reads documents)."""
    from fles1.bm25 import bm25_run

    data = load_beir(write_beir(tmp_path / "toy"))
    assert list(bm25_run(data, ["q4"], k=1)["q4"]) == ["d3"]  # "green tea cancer": four documents hold "cancer"
    corpus = [{"_id": "d1", "title": "Aspirin", "text": "Pain relief trials."},
              {"_id": "d2", "title": "", "text": "Heart health and pain."}]
    titled = load_beir(write_beir(tmp_path / "titled", corpus, [{"_id": "q1", "text": "aspirin"}], [("q1", "d1", 1)]))
    assert list(bm25_run(titled, ["q1"])["q1"]) == ["d1"]


def test_bm25_on_nfcorpus_reproduces_the_readmes_baseline(nfcorpus_dir):
    """The README's and the cards' BM25 row (bm25s: Lucene, k1 1.5, b 0.75, English stop words, Snowball stemmer,
    title + text): nfcorpus test NDCG@10 0.3210, Recall@100 0.2466. Another k1 or no stop words passed every test
    (k1 1.2: 0.3180; no stop words: 0.3195). bm25s 0.2.10, the floor, gives 0.3208."""
    from fles1.bm25 import bm25_run

    data = load_beir(nfcorpus_dir, "test")
    metrics = evaluate_run(data.qrels, bm25_run(data, sorted(data.qrels), k=1000))
    assert metrics["ndcg@10"] == pytest.approx(0.3210, abs=5e-4) and round(metrics["recall@100"], 4) == 0.2466


def test_each_metric_is_its_own_trec_eval_measure_and_cut():
    """recall@100 read from recall_1000, or map@100 from another measure, passed: no test had a relevant document
    between ranks 100 and 1000. Here one relevant document is at rank 1, the other at 150."""
    qrels = {"a": {"x": 1, "y": 1}}
    run = {"a": {"x": 1000.0, **{f"n{i:03d}": 999.0 - i for i in range(148)}, "y": 1.0}}
    assert list(run["a"]).index("y") == 149  # rank 150
    metrics = evaluate_run(qrels, run)
    assert metrics == pytest.approx({"ndcg@10": 1 / (1 + 1 / math.log2(3)), "mrr@10": 1.0, "recall@100": 0.5,
                                     "map@100": 0.5, "recall@1000": 1.0})


def test_an_unreadable_data_file_or_another_header_is_one_error_naming_it(tmp_path, monkeypatch, capsys):
    """An unreadable corpus.jsonl (permissions) was a PermissionError traceback, exit 1; a qrels header spelt otherwise
    than BEIR's said "score 'score' is not a number"."""
    import builtins

    folder = write_beir(tmp_path / "toy")
    corpus = os.path.join(folder, "corpus.jsonl")
    real_open = builtins.open

    def refusing_open(path, *args, **kwargs):  # as for a chmod 000 file (root reads those, so tests cannot chmod)
        if os.fspath(path) == corpus:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(BEIRDataError, match=rf"^{corpus}: cannot be read \(Permission denied\)$"):
        load_beir(folder)
    assert eval_fles1.main(["--model", "unused", "--data", folder, "--output", str(tmp_path / "r.json")]) == 2
    assert f"error: {corpus}: cannot be read (Permission denied)" in capsys.readouterr().err
    monkeypatch.setattr(builtins, "open", real_open)
    qrels = os.path.join(folder, "qrels", "test.tsv")
    with open(qrels) as handle:
        lines = handle.read().splitlines()
    with open(qrels, "w") as handle:
        handle.write("\n".join(["query_id\tcorpus_id\tscore", *lines[1:]]) + "\n")
    with pytest.raises(BEIRDataError, match=r"test.tsv:1: a header BEIR does not write \(query_id / corpus_id / "
                                            r"score\): its qrels start with 'query-id<TAB>corpus-id<TAB>score'"):
        load_beir(folder)
