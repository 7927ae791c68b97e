"""Unit tests of the training pieces: sparse backward, loss and regularizer formulas, data, bad input."""

import gzip
import importlib.util
import json
import os
import re

import pytest
import torch

from fles1.beir import BEIRDataError, load_beir
from fles1.training.data import beir_examples, load_training_examples, triples_examples
from fles1.training.losses import info_nce
from fles1.training.recipe import load_recipe
from fles1.training.regularizers import anti_collapse, get_regularizer, l1_flops, squared_flops
from modeling_fles1 import _MaxPooledProjection


@pytest.mark.parametrize("chunk_tokens", [1, 4, 64])  # one text per chunk .. all texts in one chunk
def test_max_pooled_projection_gradcheck(chunk_tokens):
    torch.manual_seed(0)
    hidden = torch.randn(3, 4, 5, dtype=torch.double, requires_grad=True)
    weight = torch.randn(7, 5, dtype=torch.double, requires_grad=True)
    bias = torch.randn(7, dtype=torch.double, requires_grad=True)
    fn = lambda h, w, b: _MaxPooledProjection.apply(h, w, b, chunk_tokens)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    # and it equals autograd through the dense (batch x length x vocab) logits, ReLU'd as in training
    dense = torch.relu((hidden @ weight.t() + bias).amax(dim=1))
    sparse = torch.relu(fn(hidden, weight, bias))
    upstream = torch.randn_like(dense)
    expected = torch.autograd.grad((dense * upstream).sum(), (hidden, weight, bias))
    got = torch.autograd.grad((sparse * upstream).sum(), (hidden, weight, bias))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_info_nce_matches_explicit_formula():
    torch.manual_seed(0)
    queries, documents = torch.rand(3, 6), torch.rand(3 * 4, 6)
    scores = queries @ documents.t() / 0.05
    expected = sum(torch.logsumexp(scores[i], 0) - scores[i, i * 4] for i in range(3)) / 3
    torch.testing.assert_close(info_nce(queries, documents, group_size=4, temperature=0.05), expected)
    with pytest.raises(ValueError, match="documents"):
        info_nce(queries, documents[:-1], group_size=4)


def test_info_nce_scores_in_float32_under_bf16_autocast():
    """The v14 recipe trains under bf16 autocast: the score matmul ran in bf16, where logits in the hundreds
    (sparse dot products / 0.05) step by 2-4 -- the softmax, loss and gradients off by that much."""
    torch.manual_seed(0)
    queries = torch.rand(4, 64, requires_grad=True)
    documents = torch.rand(4 * 8, 64) * 3
    expected = info_nce(queries, documents, group_size=8, temperature=0.05)
    (expected_grad,) = torch.autograd.grad(expected, queries)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(queries, documents, group_size=8, temperature=0.05)
    (grad,) = torch.autograd.grad(loss, queries)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert info_nce(queries.double(), documents.double(), group_size=8).dtype == torch.float64  # never lowered
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)


def test_false_negatives_are_left_out_of_the_denominator():
    from fles1.training.trainer import false_negative_mask

    relevance = [
        {"documents": ["d1", "n1"], "relevant": ["d1", "d2"]},  # query 0 also finds query 1's positive relevant
        {"documents": ["d2", "n2"], "relevant": ["d2"]},
    ]
    mask = false_negative_mask(relevance)
    assert mask.tolist() == [[False, False, True, False], [False, False, False, False]]
    torch.manual_seed(0)
    queries, documents = torch.rand(2, 5), torch.rand(4, 5)
    scores = queries @ documents.t() / 0.05
    kept = [0, 1, 3]  # query 0 without d2
    expected = (torch.logsumexp(scores[0, kept], 0) - scores[0, 0] + torch.logsumexp(scores[1], 0) - scores[1, 2]) / 2
    torch.testing.assert_close(info_nce(queries, documents, 2, 0.05, false_negatives=mask), expected)
    assert info_nce(queries, documents, 2, 0.05, false_negatives=mask) < info_nce(queries, documents, 2, 0.05)


def test_false_negatives_leave_the_denominator_even_at_scores_near_zero():
    """A masked score set to 0 instead of -inf still adds exp(0) = 1 to the denominator: invisible next to
    scores in the tens (the test above), a large error when every score is near 0 (an early, sparse model)."""
    from fles1.training.trainer import false_negative_mask

    relevance = [
        {"documents": ["d1", "n1"], "relevant": ["d1", "d2"]},
        {"documents": ["d2", "n2"], "relevant": ["d2"]},
    ]
    torch.manual_seed(0)
    queries, documents = torch.rand(2, 5) * 0.001, torch.rand(4, 5)
    scores = queries @ documents.t() / 0.05
    kept = [0, 1, 3]  # query 0 without d2
    expected = (torch.logsumexp(scores[0, kept], 0) - scores[0, 0] + torch.logsumexp(scores[1], 0) - scores[1, 2]) / 2
    got = info_nce(queries, documents, 2, 0.05, false_negatives=false_negative_mask(relevance))
    torch.testing.assert_close(got, expected)


def test_a_ranks_queries_are_scored_against_every_ranks_documents_from_its_offset():
    """Under DDP the queries meet all ranks' documents, their own groups from ``document_offset`` on: labels
    without the offset pointed at rank 0's positives, and a matrix holding exactly the rows needed was refused."""
    torch.manual_seed(0)
    queries, documents = torch.rand(2, 6), torch.rand(10, 6)  # 2 queries x group 2 at rows 4-7 of 10
    scores = queries @ documents.t() / 0.05
    expected = sum(torch.logsumexp(scores[i], 0) - scores[i, 4 + i * 2] for i in range(2)) / 2
    torch.testing.assert_close(info_nce(queries, documents, 2, 0.05, document_offset=4), expected)
    # the last rank: its groups end the matrix, exactly offset + B * group rows
    tail = documents[:8]
    tail_scores = queries @ tail.t() / 0.05
    expected = sum(torch.logsumexp(tail_scores[i], 0) - tail_scores[i, 4 + i * 2] for i in range(2)) / 2
    torch.testing.assert_close(info_nce(queries, tail, 2, 0.05, document_offset=4), expected)
    with pytest.raises(ValueError, match="expected 2 x 2 documents from row 5 for 2 queries, got 8"):
        info_nce(queries, tail, 2, 0.05, document_offset=5)


def test_the_false_negative_mask_spares_each_querys_own_positive_at_the_offset():
    """Over all ranks' documents a query's own positive is row ``offset + i * group``: without the offset the
    positive of this rank's query was masked out of its own numerator's row (-inf: an infinite loss) and rank 0's
    row at i * group spared instead."""
    from fles1.training.trainer import false_negative_mask

    relevance = [{"documents": ["d3", "n3"], "relevant": ["d3", "d1"]}]  # rank 1's only query
    everything = ["d1", "n1", "d3", "n3"]  # rank 0's group, then rank 1's
    mask = false_negative_mask(relevance, everything, offset=2)
    assert mask.tolist() == [[True, False, False, False]]  # d1 (rank 0's positive) masked; its own d3 kept
    assert false_negative_mask(relevance, everything).tolist() == [[False, False, True, False]]  # offset 0 differs


def test_beir_examples_with_ids_feed_the_mask(nfcorpus_dir, backbone_dir):
    from transformers import AutoTokenizer

    from fles1.beir import load_beir
    from fles1.training.trainer import FLES1Collator

    data = load_beir(nfcorpus_dir, "train")
    examples = beir_examples(data, num_negatives=2, seed=0, with_ids=True)
    assert "relevance" in examples.column_names and "relevance" not in beir_examples(data, 2, 0).column_names
    row = examples[0]
    query_id = sorted(data.qrels)[0]
    assert row["relevance"]["documents"][0] in data.qrels[query_id]
    assert set(row["relevance"]["relevant"]) == {d for d, rel in data.qrels[query_id].items() if rel > 0}
    collator = FLES1Collator(AutoTokenizer.from_pretrained(backbone_dir), 16, 32)
    rows = [examples[i] for i in range(8)]
    batch = collator(rows)
    assert batch["documents"]["input_ids"].shape[0] == 8 * 3  # the id column is not tokenized as a document
    assert batch["false_negatives"].shape == (8, 24) and not batch["false_negatives"][:, ::3].diagonal().any()
    rounded = FLES1Collator(collator.tokenizer, 16, 32, pad_to_multiple_of=8)(rows)  # GPU shape rounding
    for name in ("query", "documents"):
        length, natural = rounded[name]["input_ids"].shape[1], batch[name]["input_ids"].shape[1]
        assert length % 8 == 0 and natural <= length < natural + 8
        assert torch.equal(rounded[name]["input_ids"][:, :natural], batch[name]["input_ids"])
        assert not rounded[name]["attention_mask"][:, natural:].any()
    unrounded = FLES1Collator(collator.tokenizer, 16, 32, pad_to_multiple_of=12)(rows)  # 12 divides neither length
    assert all(torch.equal(unrounded[name]["input_ids"], batch[name]["input_ids"]) for name in ("query", "documents"))


def test_regularizer_formulas():
    w = torch.rand(4, 9)
    torch.testing.assert_close(l1_flops(w), sum(w[:, v].mean() for v in range(9)))
    torch.testing.assert_close(squared_flops(w), sum(w[:, v].mean() ** 2 for v in range(9)))
    assert float(anti_collapse(w * 100, min_mass=5.0)) == 0.0  # no push while documents keep their mass
    assert float(anti_collapse(torch.zeros(2, 9), min_mass=5.0)) == 1.0  # full push at collapse
    # in between: mean_b ReLU(1 - mass_b / m)^2 -- the square is what the ends above cannot tell apart
    partial = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 2.0]])
    assert float(anti_collapse(partial, min_mass=4.0)) == pytest.approx(((1 - 3 / 4) ** 2 + (1 - 2 / 4) ** 2) / 2)
    assert get_regularizer("flops") is squared_flops and get_regularizer("l1_flops") is l1_flops


def test_beir_examples_are_seeded_and_negatives_unjudged(nfcorpus_dir):
    from fles1.beir import load_beir

    data = load_beir(nfcorpus_dir, "train")
    first, again, other = beir_examples(data, seed=0), beir_examples(data, seed=0), beir_examples(data, seed=1)
    assert len(first) == 2590  # one example per train query
    assert first[:5] == again[:5] and first[:5] != other[:5]
    texts = {data.document_text(d): d for d in data.corpus}
    queries = {text: qid for qid, text in data.queries.items()}
    for row in first.select(range(20)):
        judged = data.qrels[queries[row["query"]]]
        assert judged.get(texts[row["positive"]], 0) > 0
        assert all(texts[row[f"negative_{i}"]] not in judged for i in range(1, 8))


def test_beir_examples_built_in_chunks_equal_one_table(nfcorpus_dir, monkeypatch):
    # rows become Arrow a chunk at a time (memory): chunk borders must not change a row, a column or its type
    import fles1.training.data as data_module
    from fles1.beir import load_beir

    data = load_beir(nfcorpus_dir, "train")
    whole = beir_examples(data, num_negatives=2, seed=4, with_ids=True, positive="bm25")
    monkeypatch.setattr(data_module, "CHUNK_ROWS", 1000)  # 2590 rows: two full chunks and a part
    chunked = beir_examples(data, num_negatives=2, seed=4, with_ids=True, positive="bm25")
    assert chunked.features == whole.features and chunked.to_dict() == whole.to_dict()
    assert len(chunked) == 2590 and chunked["relevance"][2589] == whole["relevance"][2589]


def test_triples_examples_keep_own_negative(msmarco_toy_dir):
    rows = triples_examples(os.path.join(msmarco_toy_dir, "triplets", "raw.tsv"), num_negatives=7, seed=0)
    assert len(rows) == 100 and len(rows.column_names) == 9
    assert load_training_examples(msmarco_toy_dir)[:3] == rows[:3]  # folder form finds triplets/raw.tsv
    for row in rows.select(range(10)):
        negatives = [row[f"negative_{i}"] for i in range(1, 8)]
        assert row["positive"] not in negatives and len(set(negatives)) == 7


def test_triples_never_draw_another_positive_of_the_same_query(tmp_path):
    """Only the row's own positive was excluded: with rows (q1, A, n1) and (q1, B, n2), B was drawn as a negative of
    the row whose positive is A (MS MARCO triples repeat queries) for 33 of 50 seeds."""
    path = tmp_path / "repeated.tsv"
    rows = [("q1", "A", "n1"), ("q1", "B", "n2")] + [(f"q{i}", f"p{i}", f"m{i}") for i in range(2, 6)]
    path.write_text("".join(f"{q}\t{p}\t{n}\n" for q, p, n in rows))
    for seed in range(50):
        examples = triples_examples(str(path), num_negatives=7, seed=seed)
        for row in examples.select(range(2)):
            negatives = {row[f"negative_{i}"] for i in range(1, 8)}
            assert not negatives & {"A", "B"}, (seed, row)
    with pytest.raises(ValueError, match=r"repeated\.tsv:1: the row's query has 9 passages left to draw from "
                                         r"\(of 12 distinct"):
        triples_examples(str(path), num_negatives=11)


def test_a_triples_negative_the_file_judges_relevant_is_replaced_with_a_warning(tmp_path):
    """(q1, A, A) kept A as its own negative, and with (q2, B, C) + (q2, C, B) each row's negative was the other's
    positive: the model was taught a judged match is a non-match."""
    path = tmp_path / "conflicting.tsv"
    rows = [("q1", "A", "A"), ("q2", "B", "C"), ("q2", "C", "B")] + [(f"q{i}", f"p{i}", f"m{i}") for i in range(3, 9)]
    path.write_text("".join(f"{q}\t{p}\t{n}\n" for q, p, n in rows))
    with pytest.warns(UserWarning, match=r"3 row\(s\) \(first: line 1\) give as negative a passage the file calls "
                                         r"relevant to the same query"):
        examples = triples_examples(str(path), num_negatives=3, seed=0)
    judged = {"q1": {"A"}, "q2": {"B", "C"}}
    for row in examples.select(range(3)):
        negatives = [row[f"negative_{i}"] for i in range(1, 4)]
        assert not set(negatives) & judged[row["query"]] and len(set(negatives)) == 3
    assert examples[3]["negative_1"] == "m3"  # an unconflicted row keeps its own negative first


def test_triples_file_errors_name_file_and_line(msmarco_toy_dir, tmp_path):
    lines = open(os.path.join(msmarco_toy_dir, "triplets", "raw.tsv"), "rb").read().splitlines(keepends=True)
    latin1 = tmp_path / "latin1.tsv"  # a Latin-1 byte used to be a bare "'utf-8' codec can't decode" from a buffer
    latin1.write_bytes(b"".join(lines[:3]) + b"caf\xe9 au lait\tpositive\tnegative\n")
    with pytest.raises(ValueError, match=r"latin1\.tsv:4: not UTF-8 \(byte 0xe9 at 3\)"):
        triples_examples(str(latin1))
    two_columns = tmp_path / "two.tsv"
    two_columns.write_bytes(b"".join(lines[:5]) + b"query\tpositive only\n")
    with pytest.raises(ValueError, match=r"two\.tsv:6: expected 3 tab-separated columns"):
        triples_examples(str(two_columns))
    crlf = tmp_path / "crlf.tsv"  # Windows line ends read as the same triples
    crlf.write_bytes(b"".join(line.rstrip(b"\r\n") + b"\r\n" for line in lines))
    assert triples_examples(str(crlf))[:5] == triples_examples(os.path.join(msmarco_toy_dir, "triplets", "raw.tsv"))[:5]
    gzipped = tmp_path / "raw.tsv.gz"  # was "not UTF-8 (byte 0x8b at 1)"
    gzipped.write_bytes(gzip.compress(b"".join(lines)))
    with pytest.raises(ValueError, match=r"raw\.tsv\.gz: gzip-compressed; gunzip it first"):
        triples_examples(str(gzipped))
    carriage = tmp_path / "cr.tsv"  # was the csv module's "do you need to open the file in universal-newline mode?"
    carriage.write_bytes(b"".join(lines[:3]) + b"a query\tpositive\rtext\tnegative\n")
    with pytest.raises(ValueError, match=r"cr\.tsv:4: a carriage return inside a field"):
        triples_examples(str(carriage))
    blank = tmp_path / "blank.tsv"  # was "no query has a relevant document": BEIR's wording
    blank.write_bytes(b"\n\n")
    with pytest.raises(ValueError, match=r"blank\.tsv: no training examples \(no query <tab> positive <tab> negative"):
        triples_examples(str(blank))


def test_triples_with_too_few_passages_for_the_negatives_are_refused_not_drawn_forever(tmp_path):
    """A row whose own negative is its positive brings no negative: it needs all num_negatives from the pool."""
    path = tmp_path / "triples.tsv"
    path.write_text("q1\tA\tA\nq2\tB\tC\nq3\tD\tE\n")  # 5 passages; q1 may draw from B, C, D, E only
    with pytest.warns(UserWarning, match="give as negative a passage the file calls relevant"):
        assert len(triples_examples(str(path), num_negatives=4)) == 3
    with pytest.raises(ValueError, match=r"triples.tsv:1: the row's query has 4 passages left to draw from .* too "
                                         r"few for 5 negatives"):
        triples_examples(str(path), num_negatives=5)


def test_a_triples_header_row_is_not_trained_as_an_example(msmarco_toy_dir, tmp_path):
    """A header line ("query <tab> positive <tab> negative") was example 1: the model was taught that the word
    "query" matches "positive" and not "negative"."""
    toy = os.path.join(msmarco_toy_dir, "triplets", "raw.tsv")
    body = open(toy, "rb").read()
    for header in (b"query\tpositive\tnegative\n", b"Query\tPos\tNeg\r\n",
                   b"anchor\tpositive_passage\tnegative_passage\n"):
        path = tmp_path / "header.tsv"
        path.write_bytes(header + body)
        assert triples_examples(str(path), num_negatives=7, seed=0)[:] == triples_examples(toy, 7, 0)[:], header
    ids = tmp_path / "ids.tsv"  # MS MARCO's qidpidtriples: numbers, with or without their header
    for header in (b"", b"qid\tpid_pos\tpid_neg\n"):
        ids.write_bytes(header + b"".join(b"%d\t%d\t%d\n" % (i, 100 + i, 200 + i) for i in range(10)))
        with pytest.raises(ValueError, match=r"ids\.tsv: every row is three numbers: id triples \(MS MARCO's "
                                             r"qidpidtriples\), not texts"):
            triples_examples(str(ids), num_negatives=2)
    later = tmp_path / "later.tsv"  # only a first row is a header: the same text further down is a triple
    later.write_bytes(body + b"query\tpositive\tnegative\n")
    assert len(triples_examples(str(later))) == 101


def test_blank_queries_and_positives_are_left_out_with_a_warning(tmp_path):
    """An empty query or positive trained as [CLS] [SEP] without a word: FLES1Encoder encodes it to the empty
    vector, so the example teaches nothing the model is used for."""
    path = tmp_path / "blank.tsv"
    rows = [("q1", "p1", "n1"), ("  ", "p2", "n2"), ("q3", "", "n3")] + \
        [(f"q{i}", f"p{i}", f"n{i}") for i in range(4, 9)]
    path.write_text("".join(f"{q}\t{p}\t{n}\n" for q, p, n in rows))
    with pytest.warns(UserWarning, match=r"blank\.tsv: 2 example\(s\) left out \(first: line 2\): its query or "
                                         r"positive is empty"):
        examples = triples_examples(str(path), num_negatives=3, seed=0)
    assert examples["query"] == ["q1"] + [f"q{i}" for i in range(4, 9)]

    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = {"d0": "", "d1": "   ", "d2": "doc two"} | {f"d{i}": f"doc {i}" for i in range(3, 12)}
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in docs.items()))
    queries = {"q1": "only blank positives", "q2": " ", "q3": "one blank, one real positive"}
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries.items()))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\t1\nq1\td1\t1\nq2\td2\t1\n"
                                                "q3\td0\t1\nq3\td3\t1\n")
    data = load_beir(str(folder), "train")
    for seed in range(10):  # q3's blank relevant document is never its positive
        with pytest.warns(UserWarning, match=r"2 example\(s\) left out \(first: query 'q1'\): its query, or every "
                                             r"relevant document, is empty"):
            examples = beir_examples(data, num_negatives=2, seed=seed)
        assert examples["query"] == [queries["q3"]] and examples["positive"] == ["doc 3"]
    with pytest.warns(UserWarning, match="left out"):  # the blank relevant document is still masked as relevant
        assert beir_examples(data, 2, 0, with_ids=True)["relevance"][0]["relevant"] == ["d0", "d3"]


def test_beir_examples_name_judged_queries_without_a_relevant_document(tmp_path):
    """A query judged only with grade 0 (or only relevant to documents the corpus lacks) gave no example, without a
    word -- where a blank one was warned about and counted."""
    import warnings

    from fles1.beir import load_beir
    from fles1.training.data import beir_examples

    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"doc {i}"}) + "\n"
                                                 for i in range(8)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": f"query {q}"}) + "\n"
                                                  for q in ("q1", "qzero")))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nqzero\td2\t0\n")
    data = load_beir(str(folder), "train")
    with pytest.warns(UserWarning, match=r"beir \(train\): 1 judged quer\(ies\) without a relevant document \(grade > "
                                         r"0\) in the corpus, no training example \(first: 'qzero'\)"):
        examples = beir_examples(data, num_negatives=2)
    assert examples["query"] == ["query q1"]
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every judged query gives its example: nothing to say
        beir_examples(load_beir(str(folder), "train"), num_negatives=2)


def test_num_negatives_and_seed_are_named_as_the_recipes_keys(msmarco_toy_dir):
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "fles1-tiny-nfcorpus.yaml")
    for key, value, message in (("data.num_negatives", -1, "data.num_negatives must be an int >= 0, got -1"),
                                ("data.num_negatives", 2.5, "data.num_negatives must be an int >= 0, got 2.5"),
                                ("data.seed", "x", "data.seed must be an int, got 'x'")):
        with pytest.raises(ValueError, match=message):  # was the data module's "num_negatives must ..."
            load_recipe(recipe, {"model.path": "m", "data.source": "d", key: value})
    with pytest.raises(ValueError, match=r"raw\.tsv: a triples source needs num_negatives >= 1 "
                                         r"\(data.num_negatives"):
        load_training_examples(msmarco_toy_dir, num_negatives=0)


@pytest.mark.parametrize("options,named", [
    ({"positive": "bm25"}, r"positive='bm25' \(data.positive\) need"),
    ({"with_ids": True}, r"mask_false_negatives=True \(data.mask_false_negatives\) need"),
    ({"split": "dev"}, r"split='dev' \(data.split\) need"),  # trained on the one file, the split unheard
])
def test_triples_refuse_settings_that_need_relevance_judgements(msmarco_toy_dir, options, named):
    """A triples source used to drop data.positive=bm25, data.mask_false_negatives=true and data.split silently."""
    with pytest.raises(ValueError, match=rf"raw\.tsv: a triples TSV has no relevance judgements or splits, which "
                                         rf"{named}"):
        load_training_examples(msmarco_toy_dir, **options)


def test_an_unreadable_triples_file_is_named_as_the_data(msmarco_toy_dir, monkeypatch):
    """train_fles1.py prefixed every OSError with model.path=... (an unreadable data file blamed on the model)."""
    import fles1.training.data as data

    def unreadable(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(data, "open", unreadable, raising=False)
    with pytest.raises(ValueError, match=r"data.source='.*msmarco-toy': \[Errno 13\] Permission denied"):
        load_training_examples(msmarco_toy_dir)


def test_tab_separated_files_csv_refuses_name_file_and_line_and_long_passages_load(msmarco_toy_dir, tmp_path):
    """A stray carriage return inside a field was a bare csv.Error traceback (for qrels: 'not a BEIR folder'), and a
    passage over 131,072 characters hit the csv module's field limit."""
    from fles1.beir import BEIRDataError, load_beir
    from fles1.training.data import read_triples
    from test_eval import write_beir

    stray = tmp_path / "stray.tsv"
    stray.write_bytes(b"q1\tp1\tn1\nq2\tp2 \r more\tn2\n")
    with pytest.raises(ValueError, match=rf"stray\.tsv:2: a carriage return inside a field"):
        read_triples(str(stray))
    long = tmp_path / "long.tsv"
    long.write_text("q1\t" + "word " * 40_000 + "\tn1\n")
    assert len(read_triples(str(long))[0][2]) == 200_000
    folder = write_beir(tmp_path / "beir")
    with open(os.path.join(folder, "qrels", "test.tsv"), "ab") as handle:
        handle.write(b"q1\td2\r\t1\n")
    with pytest.raises(BEIRDataError, match=r"qrels[/\\]test\.tsv:\d+: a carriage return inside a field"):
        load_beir(folder)


def _beir_folder(tmp_path, qrels_rows):
    (tmp_path / "qrels").mkdir(parents=True)
    (tmp_path / "corpus.jsonl").write_text(
        "".join(f'{{"_id": "d{i}", "title": "", "text": "doc {i}"}}\n' for i in range(10)))
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "query one"}\n')
    (tmp_path / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels_rows)
    return str(tmp_path)


def test_bm25_positive_is_the_relevant_document_bm25_ranks_first(tmp_path):
    from fles1.beir import load_beir

    folder = tmp_path / "bm25"
    (folder / "qrels").mkdir(parents=True)
    texts = ["vitamin d and bone health in older adults", "a cohort study of diet", "bone", "unrelated text"]
    (folder / "corpus.jsonl").write_text("".join(f'{{"_id": "d{i}", "text": "{t}"}}\n' for i, t in enumerate(texts)))
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "vitamin d bone health"}\n')
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td0\t1\nq1\td2\t1\n")
    data = load_beir(str(folder), "train")
    for seed in range(5):
        assert beir_examples(data, num_negatives=1, seed=seed, positive="bm25")[0]["positive"] == texts[0]
    assert {beir_examples(data, 1, seed)[0]["positive"] for seed in range(20)} == set(texts[:3])  # uniform draw
    with pytest.raises(ValueError, match=r"choose one of \['random', 'bm25'\]"):
        beir_examples(data, 1, 0, positive="best")


def test_unknown_ids_and_empty_data_are_clear_errors(tmp_path):
    with pytest.raises(BEIRDataError, match="'d99' is not in corpus"):
        load_training_examples(_beir_folder(tmp_path / "a", "q1\td99\t1\n"))
    with pytest.raises(ValueError, match="no training examples"):
        load_training_examples(_beir_folder(tmp_path / "b", "q1\td1\t0\n"))
    with pytest.raises(ValueError, match="not a BEIR folder"):
        load_training_examples(str(tmp_path / "missing-folder"))
    data = load_beir(_beir_folder(tmp_path / "c", "q1\td1\t1\n"), "train")
    for num_negatives, seed, message in ((1.5, 0, "num_negatives must be an int >= 0, got 1.5"),
                                         (-1, 0, "num_negatives must be an int >= 0, got -1"),
                                         (1, "x", "seed must be an int, got 'x'")):
        with pytest.raises(ValueError, match=message):  # 1.5 was a TypeError from random.sample
            beir_examples(data, num_negatives, seed)


@pytest.mark.parametrize("key,value,message", [
    ("clfr.target_nnz_d", 0, "clfr.target_nnz_d must be a finite number > 0"),
    ("clfr.target_nnz_d", -5, "clfr.target_nnz_d must be a finite number > 0"),
    ("clfr.gain", 0.0, r"clfr.gain must be a number in \(0, 1\]"),
    ("clfr.gain", 1.5, r"clfr.gain must be a number in \(0, 1\]"),
    ("loss.regularizer", "l2", "choose one of"),
    ("clfr.bogus", 1, "unknown key 'bogus'"),
    # the training section goes to TrainingArguments: checked up front, naming the key
    ("training.lerning_rate", 1e-5, "'lerning_rate' is not a TrainingArguments setting; did you mean 'learning_rate'"),
    ("training.learning_rate", "fast", r"learning_rate: expected float, got 'fast'$"),
    ("training.per_device_train_batch_size", 0, "per_device_train_batch_size must be >= 1, got 0"),
    ("training.per_device_train_batch_size", 2.5, "per_device_train_batch_size: expected int, got 2.5"),
    ("training.bf16", "yes", "bf16: expected bool, got 'yes'"),
    ("training.output_dir", "x", "--output-dir"),
    # NaN and out-of-range numbers that used to reach the loss, the crash monitor or the optimizer
    ("loss.temperature", float("nan"), "loss.temperature must be a finite number > 0, got nan"),
    ("loss.lambda_q", -1, "loss.lambda_q must be a finite number >= 0, got -1"),
    ("loss.anticollapse_min_mass", 0, "loss.anticollapse_min_mass must be a finite number > 0, got 0"),
    ("crashes.nnz_floor", float("nan"), r"crashes.nnz_floor must be a number >= 0, got nan"),
    ("crashes.spike_window", 0, r"crashes.spike_window must be an int >= 5, got 0"),
    ("training.learning_rate", -2.0e-5, "learning_rate must be >= 0, got -2e-05"),
    ("training.learning_rate", float("nan"), "learning_rate must be >= 0, got nan"),
    ("clfr.enabled", "no", "clfr.enabled must be true or false, got 'no'"),  # a quoted "no" was truthy: CLFR on
    ("data.mask_false_negatives", 1, "data.mask_false_negatives must be true or false, got 1"),
    ("loss.gather_across_devices", "no", "loss.gather_across_devices must be true or false, got 'no'"),
    ("data.max_examples", -1, r"data.max_examples must be an int >= 1 or null \(every example\), got -1"),
    ("data.max_examples", float("nan"), "data.max_examples must be an int >= 1 or null"),  # NaN kept every example
    # these failed after the model had loaded: ZeroDivisionError, "cannot convert float NaN", a late length check
    ("training.gradient_accumulation_steps", 0, "gradient_accumulation_steps must be >= 1, got 0"),
    ("training.num_train_epochs", float("nan"), "num_train_epochs must be a number > 0, got nan"),
    ("training.num_train_epochs", 0, "num_train_epochs must be a number > 0, got 0"),
    ("model.query_max_length", 64.0, r"model.query_max_length must be an int >= 3 .* got 64.0"),
    ("model.document_max_length", 2, r"model.document_max_length must be an int >= 3 .* got 2"),
    # text or None reached a comparison: TypeError tracebacks
    ("clfr.max_log_step", "abc", r"clfr.max_log_step must be a number in \(0, 10\], got 'abc'"),
    ("clfr.max_log_step", 1000, r"clfr.max_log_step must be a number in \(0, 10\], got 1000"),  # exp() overflowed
    # a list or mapping: "unhashable type" tracebacks
    ("loss.regularizer", ["flops"], r"loss.regularizer=\['flops'\] is not supported; choose one of \['flops', 'l1_flops'\]"),
    ("loss.regularizer", {"name": "flops"}, r"loss.regularizer=\{'name': 'flops'\} is not supported; choose one of"),
    # YAML 1.1 reads an unquoted no as false: "False is not a valid SaveStrategy, please select one of ['no', ...]"
    ("training.save_strategy", False, r"training.save_strategy: expected .*, got False \(YAML 1.1 reads no/off/yes/on "
                                      r"as false/true: quote it, e.g. 'no'\)"),
    ("training.eval_strategy", True, r"training.eval_strategy: expected .*, got True \(YAML 1.1"),
    ("training.seed", False, r"training.seed: expected int, got False$"),  # no quoting advice for a number
    # written into training_log.json and every checkpoint, then published: refused without echoing it
    ("training.hub_token", "hf_" + "Ab1" * 12, r"^recipe.training.hub_token: a token in the recipe would be written "
                                               r"into training_log.json and every checkpoint [^A]*$"),
    ("training.push_to_hub", True, r"recipe.training.push_to_hub: True is not supported: the Trainer would upload "
                                   r"the raw output folder"),
    ("crashes.spike_factor", None, "crashes.spike_factor must be a number > 1, got None"),
    ("crashes.nnz_floor", "abc", "crashes.nnz_floor must be a number >= 0, got 'abc'"),
    ("crashes.nnz_collapse_fraction", "x", r"crashes.nnz_collapse_fraction must be a number in \[0, 1\), got 'x'"),
    # a bool passed as 1, an inf temperature flattened the loss
    ("clfr.interval_steps", True, "clfr.interval_steps must be an int >= 1 or null"),
    ("clfr.gain", True, r"clfr.gain must be a number in \(0, 1\], got True"),
    ("clfr.target_nnz_d", True, "clfr.target_nnz_d must be a finite number > 0 .*got True"),
    ("clfr.target_nnz_d", float("inf"), "clfr.target_nnz_d must be a finite number > 0 .*got inf"),
    ("crashes.nnz_floor", True, "crashes.nnz_floor must be a number >= 0, got True"),
    ("loss.temperature", float("inf"), "loss.temperature must be a finite number > 0, got inf"),
    ("loss.lambda_d", 0, "loss.lambda_d must be a finite number > 0 for a multiplicative controller"),  # CLFR on
    ("data.positive", "bm26", r"data.positive must be one of \['random', 'bm25'\], got 'bm26'"),
    # training values TrainingArguments lets through (or refuses only once built): once failed, or were ignored,
    # after the model had loaded
    ("training.logging_steps", 0, "training.logging_steps must be > 0"),
    ("training.logging_steps", -1, "training.logging_steps must be > 0"),
    ("training.save_steps", 0, "training.save_steps must be > 0"),
    ("training.save_steps", -2, "training.save_steps must be > 0"),
    ("training.save_total_limit", 0, r"training.save_total_limit must be >= 1, or null \(every checkpoint is kept\)"),
    ("training.save_total_limit", "2", "training.save_total_limit: expected int, got '2'"),
    ("training.max_steps", -5, r"training.max_steps must be >= 1, or -1 \(num_train_epochs decides\), got -5"),
    ("training.dataloader_num_workers", -1, "training.dataloader_num_workers must be >= 0, got -1"),
    ("training.warmup_steps", -1, r"recipe.training.warmup_steps: .*warmup_steps"),
    ("training.lr_scheduler_type", "foo", "recipe.training.lr_scheduler_type: foo is not a valid SchedulerType"),
    ("training.optim", "foo", "recipe.training.optim: foo is not a valid OptimizerNames"),
    ("training.report_to", None, "recipe.training.report_to: None is not an installed"),  # was a TypeError
    # --set data.source=1e3 arrived as a float (a TypeError traceback); data.split=null looked for qrels/None.tsv
    ("data.source", 1000.0,
     r"recipe.data.source must be a non-empty string .* got 1000.0; a folder named like a number: write it ./NAME"),
    ("data.split", None, r"recipe.data.split must be a non-empty string .* got None"),
    ("model.path", 7, r"recipe.model.path must be a non-empty string .* got 7"),
    # NaN weight decay trained NaN weights and exited 0; torch refused betas only after the model had loaded
    ("training.weight_decay", float("nan"), "recipe.training.weight_decay must be a finite number >= 0, got nan"),
    ("training.weight_decay", -0.1, "recipe.training.weight_decay must be a finite number >= 0"),
    ("training.adam_beta1", 1.5, r"recipe.training.adam_beta1 must be in \[0, 1\), got 1.5"),
    ("training.adam_beta2", 1.0, r"recipe.training.adam_beta2 must be in \[0, 1\), got 1.0"),
    ("training.adam_epsilon", float("inf"), "recipe.training.adam_epsilon must be a finite number >= 0, got inf"),
    # transformers clips only above 0: NaN or a negative norm switched clipping off silently
    ("training.max_grad_norm", float("nan"), r"recipe.training.max_grad_norm must be a finite number >= 0 \(0: no "
                                             r"clipping\), got nan"),
    ("training.max_grad_norm", -1.0, "recipe.training.max_grad_norm must be a finite number >= 0"),
    # taken by TrainingArguments, ignored by FLES1Trainer: a run trained in float32 / uncompiled / unsmoothed
    ("training.fp16", True, r"recipe.training.fp16: True is not supported: FLES-1 trains in float32 or bf16"),
    ("training.torch_compile", True, "recipe.training.torch_compile: True is not supported: FLES1Trainer encodes "
                                     "through encode_sparse"),
    ("training.label_smoothing_factor", 0.1, "recipe.training.label_smoothing_factor: 0.1 is not supported"),
    # transformers turns torch_compile on from these; the others are never read by Trainer.train (a run named a
    # checkpoint to resume and trained from step 1) or patch a forward FLES-1 does not use (a traceback after loading)
    ("training.torch_compile_mode", "default", "recipe.training.torch_compile_mode: 'default' is not supported: it "
                                               "turns torch_compile on"),
    ("training.torch_compile_backend", "inductor", "recipe.training.torch_compile_backend: 'inductor' is not supported"),
    ("training.resume_from_checkpoint", "out/checkpoint-4", r"recipe.training.resume_from_checkpoint: "
                                                            r"'out/checkpoint-4' is not supported: train_fles1.py --resume"),
    ("training.do_train", False, r"recipe.training.do_train: False is not supported: train_fles1.py always trains"),
    ("training.use_liger_kernel", True, r"recipe.training.use_liger_kernel: True is not supported: Liger kernels"),
    ("training.include_num_input_tokens_seen", True, r"recipe.training.include_num_input_tokens_seen: True is not "
                                                     r"supported: FLES-1 batches hold query and documents"),
    # what FLES1Trainer has not: refused by transformers (or a traceback) only after the model loaded
    ("training.eval_strategy", "steps", r"recipe.training.eval_strategy: 'steps' is not supported: FLES-1 training "
                                        r"runs no evaluation while it trains .*--eval-dev"),
    ("training.save_strategy", "best", r"recipe.training.save_strategy: 'best' is not supported"),
    ("training.train_sampling_strategy", "group_by_length", r"recipe.training.train_sampling_strategy: "
                                                            r"'group_by_length' is not supported: transformers' "
                                                            r"length samplers measure input_ids"),
    pytest.param("training.optim", "adamw_bnb_8bit", r"^recipe.training.optim: adamw_bnb_8bit: You need to install "
                 r"`bitsandbytes`", marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None,
                                                             reason="the optimizer's package is installed here")),
    # a schedule needing its own settings, or a kwarg it does not take: a traceback once model and data had loaded
    ("training.lr_scheduler_type", "cosine_with_min_lr", r"^recipe.training.lr_scheduler_kwargs: 'cosine_with_min_lr' "
     r"with \{\}: One of min_lr or min_lr_rate should be set"),
    ("training.lr_scheduler_type", "warmup_stable_decay", r"'warmup_stable_decay' with \{\}: .*num_decay_steps"),
    ("training.lr_scheduler_kwargs", {"foo": 1}, r"'linear' with \{'foo': 1\}: .*unexpected keyword argument 'foo'"),
    ("training.optim_args", "foo", r"^recipe.training.optim_args: adamw_torch with 'foo': not enough values"),
])
def test_bad_recipe_values(key, value, message):
    overrides = {"model.path": "m", "data.source": "d", key: value}
    with pytest.raises(ValueError, match=message):
        load_recipe(os.path.join(os.path.dirname(__file__), "..", "recipes", "fles1-tiny-nfcorpus.yaml"), overrides)


def test_an_optimizer_that_needs_the_model_is_left_to_the_trainer(monkeypatch):
    """Without a model LOMO / GaLore / Apollo say they need one (a ValueError): only a missing package is refused."""
    import transformers.trainer_optimizer as optimizers

    monkeypatch.setattr(optimizers, "is_lomo_available", lambda: True)  # as if installed
    path = os.path.join(os.path.dirname(__file__), "..", "recipes", "fles1-tiny-nfcorpus.yaml")
    assert load_recipe(path, {"model.path": "m", "data.source": "d", "training.optim": "lomo"})["training"]["optim"] \
        == "lomo"


def test_memory_only_settings_may_change_on_resume():
    from fles1.training.run import recipe_changes

    saved = {"recipe": {"training": {"gradient_checkpointing": None}}}
    for changed in ({"gradient_checkpointing": True}, {"gradient_checkpointing_kwargs": {"use_reentrant": False}},
                    {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}):
        assert recipe_changes(saved, {"training": changed}) == [], changed
    assert recipe_changes(saved, {"training": {"learning_rate": 1.0}}) != []


@pytest.mark.parametrize("key, value, message", [
    ("clfr.gain", 5, r"clfr.gain must be a number in \(0, 1\], got 5"),
    ("clfr.interval_steps", 0, "clfr.interval_steps must be an int >= 1 or null"),
    ("clfr.target_nnz_d", -1, "clfr.target_nnz_d must be a finite number > 0"),
])
def test_clfr_settings_are_checked_with_clfr_off(key, value, message):
    """They were accepted unread, recorded in the training log, and wrong the day CLFR was turned on."""
    overrides = {"model.path": "m", "data.source": "d", "clfr.enabled": False, "loss.lambda_d": 0.0}
    path = os.path.join(os.path.dirname(__file__), "..", "recipes", "fles1-tiny-nfcorpus.yaml")
    assert load_recipe(path, overrides)["loss"]["lambda_d"] == 0.0  # a fixed lambda_d may be 0 without CLFR
    with pytest.raises(ValueError, match=message):
        load_recipe(path, {**overrides, key: value})


@pytest.mark.parametrize("text, message", [
    ("loss: 0.05\n", "recipe.loss must be a mapping of settings, got float 0.05"),
    ("- training\n", r"recipe must be a mapping of settings, got list \['training'\]"),
    ("clfr:\n  enabled: [1]\ndata: abc\n", "recipe.data must be a mapping of settings, got str 'abc'"),
])
def test_a_recipe_file_whose_sections_are_not_mappings_is_named(tmp_path, text, message):
    """Tracebacks ('float' object is not subscriptable, 'list' object has no attribute 'items')."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_recipe(str(path), {"model.path": "m", "data.source": "d"})


def test_a_recipe_file_with_a_key_twice_or_not_utf8_is_named(tmp_path):
    """YAML keeps the last of two equal keys: `gain: 0.1` then `gain: 1.0` trained with 1.0, silently; a Latin-1
    file's error named no file."""
    path = tmp_path / "recipe.yaml"
    path.write_text("clfr:\n  gain: 0.1\n  target_nnz_d: 300\n  gain: 1.0\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not valid YAML at line 4, column 3: found 'gain' "
                                         "again"):
        load_recipe(str(path))
    path.write_bytes("loss:\n  temperature: 0.05 # τ\n".encode("latin-1", errors="replace").replace(b"?", b"\xe4"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(a byte 0xe4; save it as UTF-8\)"):
        load_recipe(str(path))
    path.write_text("clfr:\n  gain: 0.5\ndata:\n  seed: 1\n")  # one key per mapping: the same name elsewhere is fine
    assert load_recipe(str(path), {"model.path": "m", "data.source": "d"})["clfr"]["gain"] == 0.5
    # YAML merge keys override what they merge; an unhashable key is YAML's own error, not a traceback
    path.write_text("clfr:\n  <<: {gain: 0.5, target_nnz_d: 300}\n  gain: 0.25\n")
    assert load_recipe(str(path), {"model.path": "m", "data.source": "d"})["clfr"]["gain"] == 0.25
    path.write_text("clfr:\n  ? [a, b]\n  : 1\n")
    with pytest.raises(ValueError, match=r"not valid YAML at line 2, column 5: found unhashable key"):
        load_recipe(str(path))


def test_a_recipe_section_left_empty_keeps_its_defaults(tmp_path):
    """A section whose keys are all commented out reads as null: it replaced the defaults (a TypeError)."""
    path = tmp_path / "recipe.yaml"
    path.write_text("clfr:\n#  enabled: false\ntraining:\nloss:\n  temperature: 0.5\n")
    recipe = load_recipe(str(path), {"model.path": "m", "data.source": "d"})
    defaults = load_recipe(None, {"model.path": "m", "data.source": "d"})
    assert recipe["clfr"] == defaults["clfr"] and recipe["training"] == defaults["training"]
    assert recipe["loss"]["temperature"] == 0.5
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert load_recipe(str(tmp_path / "empty.yaml"), {"model.path": "m", "data.source": "d"}) == defaults


def test_an_uninstalled_report_to_integration_fails_with_the_recipe():
    """It was a RuntimeError traceback ("WandbCallback requires wandb") once the model had loaded."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    missing = sorted(set(INTEGRATION_TO_CALLBACK) - set(get_available_reporting_integrations()))
    if not missing:
        pytest.skip("every reporting integration is installed")
    overrides = {"model.path": "m", "data.source": "d", "training.report_to": missing[0]}
    with pytest.raises(ValueError, match=rf"training.report_to: {missing[0]} is not an installed reporting integration"):
        load_recipe(os.path.join(os.path.dirname(__file__), "..", "recipes", "fles1-tiny-nfcorpus.yaml"), overrides)


def test_trainer_rejects_empty_dataset_and_oversized_batch(tiny_random_checkpoint, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainingArguments

    from fles1.training.trainer import FLES1Trainer
    from modeling_fles1 import FLES1ForMaskedLM

    model = FLES1ForMaskedLM.from_pretrained(tiny_random_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_random_checkpoint)
    rows = Dataset.from_dict({"query": ["a", "b"], "positive": ["c", "d"], "negative_1": ["e", "f"]})
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, report_to="none")
    with pytest.raises(ValueError, match="larger than the dataset"):
        FLES1Trainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    with pytest.raises(ValueError, match="empty"):
        FLES1Trainer(model=model, args=args, train_dataset=rows.select([]), processing_class=tokenizer)
    small = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, report_to="none")
    with pytest.raises(ValueError, match="document_max_length=600 exceeds max_position_embeddings=512"):
        FLES1Trainer(model=model, args=small, train_dataset=rows, processing_class=tokenizer, document_max_length=600)
    for length in (0, 2):  # 0 used to fall back to the config's length silently, 1-2 to train on [CLS] [SEP] only
        with pytest.raises(ValueError, match=rf"query_max_length must be an int >= 3 .*got {length}"):
            FLES1Trainer(model=model, args=small, train_dataset=rows, processing_class=tokenizer, query_max_length=length)
    small._n_gpu = 2  # two GPUs seen by one process, no torchrun: DataParallel, whose model has no encode_sparse
    with pytest.raises(ValueError, match=r"2 GPUs are visible to one process: train one process per GPU \(torchrun "
                                         r"--nproc_per_node 2"):
        FLES1Trainer(model=model, args=small, train_dataset=rows, processing_class=tokenizer)


def test_int8_screened_forward_matches_float32():
    torch.manual_seed(0)
    hidden = torch.randn(3, 12, 16, requires_grad=True)
    weight = torch.randn(3000, 16, requires_grad=True)
    bias = (torch.randn(3000) - 9.0).requires_grad_()  # a few % of entries active, as in a trained model
    upstream = torch.randn(3, 3000)
    results = []
    try:
        for screening in (False, True):
            _MaxPooledProjection.screening = screening
            values = _MaxPooledProjection.apply(hidden, weight, bias, 24)
            active = torch.relu(values)
            results.append((active.detach(), torch.autograd.grad((active * upstream).sum(), (hidden, weight, bias))))
    finally:
        _MaxPooledProjection.screening = None
    (plain, plain_grads), (screened, screened_grads) = results
    assert 0 < int((plain > 0).sum()) < plain.numel() // 4
    assert torch.equal(plain > 0, screened > 0)
    torch.testing.assert_close(screened, plain)
    for got, expected in zip(screened_grads, plain_grads):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("fraction, expected_steps", [(0.1, [4, 5]), (0.0, [5])])
def test_crash_monitor_counts_collapse_below_a_fraction_of_the_first_steps_nnz(fraction, expected_steps):
    from types import SimpleNamespace

    from fles1.training.crashes import CrashMonitor

    monitor, model = CrashMonitor(nnz_floor=1.0, nnz_collapse_fraction=fraction), torch.nn.Linear(2, 2)
    for step, nnz in enumerate([200.0, 150.0, 30.0, 15.0, 0.5]):  # 15 < 10% of 200; 0.5 < the absolute floor
        monitor.observe(loss=1.0, nnz_sum=nnz * 4, nnz_count=4)
        monitor.on_pre_optimizer_step(None, SimpleNamespace(global_step=step), None, model=model)
    assert [event["step"] for event in monitor.events if event["kind"] == "nnz_collapse"] == expected_steps
    restored = CrashMonitor(nnz_collapse_fraction=fraction)
    restored.load_state_dict(monitor.state_dict())  # resume keeps the reference
    assert restored.first_nnz == 200.0 and restored.counts == monitor.counts
    with pytest.raises(ValueError, match="nnz_collapse_fraction"):
        CrashMonitor(nnz_collapse_fraction=1.5)


def test_a_non_finite_step_is_one_crash_and_never_the_collapse_baseline():
    """A NaN batch's vectors hold no entry > 0: it was also counted as an NNZ collapse, and as the first step it set
    the baseline to 0, switching the 10%-of-the-first-step rule off for the whole run."""
    from types import SimpleNamespace

    from fles1.training.crashes import CrashMonitor

    monitor, model = CrashMonitor(nnz_floor=1.0, nnz_collapse_fraction=0.1), torch.nn.Linear(2, 2)
    for step, (loss, nnz) in enumerate([(float("nan"), 0.0), (1.0, 200.0), (1.0, 150.0), (float("nan"), 0.0),
                                        (1.0, 15.0)]):
        monitor.observe(loss=loss, nnz_sum=nnz * 4, nnz_count=4)
        monitor.on_pre_optimizer_step(None, SimpleNamespace(global_step=step), None, model=model)
    assert monitor.first_nnz == 200.0
    assert monitor.totals() == {"non_finite_loss": 2, "non_finite_grad": 0, "loss_spike": 0, "nnz_collapse": 1,
                                "total": 3}
    assert [event["step"] for event in monitor.events if event["kind"] == "nnz_collapse"] == [5]


def test_crash_monitor_judges_a_step_by_its_mean_micro_batch_loss():
    """Under gradient accumulation a step's loss was the sum of its micro-batches' losses (the log shows their
    mean): an epoch's short last step was compared against full steps' sums, and a spike there went uncounted."""
    from types import SimpleNamespace

    from fles1.training.crashes import CrashMonitor

    monitor, model = CrashMonitor(spike_factor=2, spike_window=5), torch.nn.Linear(2, 2)
    for step, losses in enumerate([[1.0] * 3] * 6 + [[2.5]]):
        for loss in losses:
            monitor.observe(loss=loss, nnz_sum=400.0, nnz_count=4)
        monitor.on_pre_optimizer_step(None, SimpleNamespace(global_step=step), None, model=model)
    assert monitor.recent_losses == [1.0] * 4 + [2.5]
    assert monitor.events == [{"step": 7, "kind": "loss_spike", "value": 2.5}]


def test_the_lambda_d_plot_is_linear_when_lambda_d_is_zero_throughout():
    """A run without regularization (lambda_d 0, CLFR off) drew an empty log-scale panel, with matplotlib's warning."""
    from fles1.training.plots import plot_series

    history = [{"step": step, "loss": 1.0, "lambda_d": 0.0} for step in (1, 2)]
    assert plot_series({"history": history, "clfr": []})["lambda_d.png"][2] is False
    history = [{**row, "lambda_d": 3e-5} for row in history]
    assert plot_series({"history": history, "clfr": []})["lambda_d.png"][2] is True


def test_training_arguments_skip_ddps_unused_parameter_search_unless_asked():
    """transformers' default (True) made DDP walk the graph for unused parameters every step and warn that it
    found none: encode_sparse uses every parameter."""
    from fles1.training.recipe import training_arguments

    assert training_arguments({"per_device_train_batch_size": 2}).ddp_find_unused_parameters is False
    assert training_arguments({"ddp_find_unused_parameters": True}).ddp_find_unused_parameters is True


def _crash_monitor_on_rank(rank: int, port: int, folder: str) -> None:
    """One of two gloo ranks feeding its own micro-batch numbers to a CrashMonitor (spawned by the test below)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from fles1.training.crashes import CrashMonitor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    monitor, model = CrashMonitor(nnz_floor=1.0, nnz_collapse_fraction=0.1), torch.nn.Linear(2, 2)
    losses = [1.0] * 5 + ([1.0, 1.0] if rank == 0 else [9.0, float("nan")])  # rank 1: a spike, then a NaN batch
    nnz = [100.0] * 7 if rank == 0 else [300.0] * 7
    for step, (loss, mean_nnz) in enumerate(zip(losses, nnz)):
        model.weight.grad = torch.ones(2, 2)  # finite: DDP's all-reduced gradients hide nothing here
        monitor.observe(loss=loss, nnz_sum=mean_nnz * 4, nnz_count=4)
        monitor.on_pre_optimizer_step(SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(global_step=step),
                                      None, model=model)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump(monitor.state_dict(), handle)
    dist.destroy_process_group()


def test_crash_monitor_judges_the_global_step_on_every_rank(tmp_path):
    """Each rank judged its own micro-batches: rank 1's loss spike went uncounted (rank 0 writes the log), its NaN
    batch was logged as a non-finite gradient (rank 0 saw only the all-reduced NaN gradient), and the ranks kept
    different collapse baselines (a resume then gave every rank rank 0's)."""
    import torch.multiprocessing

    import socket

    with socket.socket() as probe:  # a free port (a fixed one fails whenever something else holds it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_crash_monitor_on_rank, args=(port, str(tmp_path)), nprocs=2)
    states = [json.load(open(tmp_path / f"rank{rank}.json")) for rank in (0, 1)]
    assert states[0] == states[1]
    assert states[0]["first_nnz"] == 200.0  # the mean over both ranks' documents
    assert [(event["step"], event["kind"]) for event in states[0]["events"]] == [(6, "loss_spike"),
                                                                                 (7, "non_finite_loss")]
    assert states[0]["events"][0]["value"] == 5.0  # the mean of the ranks' losses


def test_training_from_a_bert_backbone_leaves_no_temporary_copy(backbone_dir, tmp_path, monkeypatch):
    """Every run from a BERT masked-LM used to leave its converted copy (~17 MB) in /tmp."""
    import tempfile

    from fles1.training.run import load_model_for_training

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, tokenizer = load_model_for_training(backbone_dir)
    assert os.listdir(tmp_path) == []
    with torch.no_grad():  # the weights outlive the deleted copy
        vector = model.encode_sparse(**tokenizer(["vitamin d and bone health"], return_tensors="pt")).sparse_embeddings
    assert model.config.model_type == "fles1" and vector.shape == (1, 30522) and vector.count_nonzero() > 0


def test_the_default_recipe_is_the_fles1_recipe():
    """The brief's recipe: InfoNCE tau 0.05 with 7 negatives, L1 FLOPS lambda_d 3e-5, anti-collapse, CLFR to 400
    with gain 0.1, AdamW lr 2e-5, batch 32, 2 epochs -- the defaults, and the shipped v14 recipe alike."""
    v14 = os.path.join(os.path.dirname(__file__), "..", "recipes", "fles1-v14.yaml")
    cpu = {"training.bf16": False, "training.dataloader_num_workers": 0}  # the GPU settings TrainingArguments checks
    for recipe in (load_recipe(None, {"model.path": "m", "data.source": "d"}), load_recipe(v14, cpu)):
        assert (recipe["loss"]["temperature"], recipe["data"]["num_negatives"]) == (0.05, 7)
        assert (recipe["loss"]["regularizer"], recipe["loss"]["lambda_d"]) == ("l1_flops", 3e-5)
        assert recipe["loss"]["anticollapse_weight"] > 0
        assert (recipe["clfr"]["enabled"], recipe["clfr"]["target_nnz_d"], recipe["clfr"]["gain"]) == (True, 400, 0.1)
        training = recipe["training"]
        assert (training["learning_rate"], training["per_device_train_batch_size"], training["num_train_epochs"]) \
            == (2e-5, 32, 2)
        assert training.get("optim", "adamw_torch") == "adamw_torch"


def test_a_misspelt_data_key_is_refused():
    with pytest.raises(ValueError, match="num_negative"):
        load_recipe(None, {"model.path": "m", "data.source": "d", "data.num_negative": 3})


def test_anti_collapse_refuses_a_mass_it_cannot_divide_by():
    for mass in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="min_mass must be > 0"):
            anti_collapse(torch.ones(2, 4), mass)


def test_negatives_are_never_judged_documents_even_when_most_of_the_corpus_is(tmp_path):
    """Judged documents (any grade, 0 included) are never drawn as negatives; with too few unjudged documents the
    error says so (a sampler that miscounted them would loop for ever)."""
    from test_eval import write_beir

    corpus = [{"_id": f"d{i}", "title": "", "text": f"doc {i}"} for i in range(6)]
    qrels = [("q1", "d0", 1), ("q1", "d1", 0), ("q1", "d2", 1), ("q1", "d3", 0)]
    data = load_beir(write_beir(tmp_path / "t", corpus, [{"_id": "q1", "text": "x"}], qrels, "train"), "train")
    for seed in range(20):
        row = beir_examples(data, num_negatives=2, seed=seed)[0]
        assert {row["negative_1"], row["negative_2"]} == {"doc 4", "doc 5"}
    with pytest.raises(ValueError, match="too few for 3 negatives"):
        beir_examples(data, num_negatives=3)


def test_the_document_with_the_query_own_id_is_never_a_negative(tmp_path):
    """Eval drops it from every ranking (BEIR's convention, e.g. Quora, where it is the query itself); training
    drew it as a negative."""
    from test_eval import write_beir

    corpus = [{"_id": f"d{i}", "title": "", "text": f"doc {i}"} for i in range(5)] + \
        [{"_id": "q1", "title": "", "text": "the query itself"}]
    data = load_beir(write_beir(tmp_path / "t", corpus, [{"_id": "q1", "text": "the query itself"}],
                                [("q1", "d0", 1)], "train"), "train")
    for seed in range(30):
        row = beir_examples(data, num_negatives=4, seed=seed)[0]
        assert {row[f"negative_{i}"] for i in range(1, 5)} == {"doc 1", "doc 2", "doc 3", "doc 4"}
    with pytest.raises(ValueError, match="leaves 4 unjudged documents, too few for 5 negatives"):
        beir_examples(data, num_negatives=5)


def test_blank_texts_are_named_when_they_leave_no_example(tmp_path):
    """The error said "no query has a relevant document" while every query had one: their texts were blank."""
    from test_eval import write_beir

    corpus = [{"_id": f"d{i}", "title": "", "text": f"doc {i}"} for i in range(5)]
    data = load_beir(write_beir(tmp_path / "t", corpus, [{"_id": "q1", "text": "  "}], [("q1", "d0", 1)], "train"),
                     "train")
    with pytest.warns(UserWarning, match="left out"), \
            pytest.raises(ValueError, match=r"no training examples \(every query with a relevant document was left "
                                            r"out: its query or its relevant documents are blank\)"):
        beir_examples(data, num_negatives=2)


def test_exponent_numbers_read_as_numbers_in_a_recipe_file_and_in_set(tmp_path):
    """YAML 1.1 reads 2e-5 as text: the file refused it ("write 2.0e-5") while --set took it -- one rule now."""
    from fles1.training.recipe import parse_overrides

    path = tmp_path / "recipe.yaml"
    path.write_text("loss:\n  lambda_d: 3e-5\ntraining:\n  learning_rate: 2e-5\n")
    from_file = load_recipe(str(path), {"model.path": "m", "data.source": "d"})
    from_set = load_recipe(None, {"model.path": "m", "data.source": "d",
                                  **parse_overrides(["training.learning_rate=2e-5", "loss.lambda_d=3e-5"])})
    for recipe in (from_file, from_set):
        assert (recipe["training"]["learning_rate"], recipe["loss"]["lambda_d"]) == (2e-5, 3e-5)
    assert parse_overrides(["data.split=nan", "data.seed=7"]) == {"data.split": "nan", "data.seed": 7}
    # only where a number is expected: text settings keep their text
    named = load_recipe(str(path), {"model.path": "m", "data.source": "d", "training.run_name": "1e3",
                                    "data.max_examples": "1e3"})
    assert (named["training"]["run_name"], named["data"]["max_examples"]) == ("1e3", 1000)
    with pytest.raises(ValueError, match="--set expects SECTION.KEY=VALUE, got 'lr'"):
        parse_overrides(["lr"])
