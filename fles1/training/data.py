"""Training examples: (query, positive, negative_1 ... negative_n) rows in a ``datasets.Dataset``.

The column layout is sentence-transformers' (anchor, positive, negatives...), so the same dataset also feeds a
``SparseEncoderTrainer`` with ``SparseMultipleNegativesRankingLoss``.

Sources (:func:`load_training_examples`):
- a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``) or a BEIR hub id (``BeIR/nfcorpus``,
  needs network): **one example per query**, its positive drawn uniformly from the query's relevant documents
  (score > 0) and its ``num_negatives`` negatives drawn uniformly from the corpus documents the query has no
  judgement for ("random negatives"). Ids in the qrels that are missing from the corpus/queries are an error
  (:class:`~fles1.beir.BEIRDataError`, naming file and line).
- an MS MARCO-style triples TSV (``query <tab> positive <tab> negative``, or a folder holding
  ``triplets/raw.tsv``): one example per row; its own negative comes first, the other ``num_negatives - 1`` are
  drawn from the other rows' passages (positives and negatives), excluding the row's own positive. A first row
  that names the columns (``query``/``question``/``anchor``, then ``pos...``, then ``neg...``, any case) is a
  header, not an example.

A query, or a positive, whose text is empty or whitespace only teaches nothing (FLES1Encoder encodes it to the
empty vector): such an example is left out, with a warning that counts them. Empty documents can still be drawn
as negatives.

Sampling uses ``random.Random(seed)``: the same seed gives the same dataset. Negatives are drawn once per run:
every epoch sees the same rows, reshuffled.

``positive="bm25"`` (BEIR sources) takes as positive the query's relevant document that BM25 (fles1.bm25) ranks
highest instead of a uniform draw -- for collections such as nfcorpus whose relevance-1 judgements include
documents only indirectly linked to the query; a query whose relevant documents BM25 does not retrieve keeps a
uniform draw, and a tie goes to the smallest document id.

``with_ids=True`` (BEIR sources) adds a ``relevance`` column: per row, the ids of its positive and negatives and
of every document judged relevant to its query, so the trainer can mask in-batch false negatives (another
query's document that is relevant to this one). Off by default so that the columns stay sentence-transformers'.
"""

from __future__ import annotations

import csv
import itertools
import os
import random
import warnings
from typing import Iterable, Optional

from datasets import Dataset, concatenate_datasets

from fles1.beir import BEIRDataError, BEIRDataset, load_beir, tsv_rows

from .checks import is_int

DEFAULT_NUM_NEGATIVES = 7


def _columns(num_negatives: int) -> list[str]:
    return ["query", "positive"] + [f"negative_{i}" for i in range(1, num_negatives + 1)]


# Rows become Arrow a chunk at a time: every row as Python strings first peaked at ~6x the Arrow table (1.1 GB
# for 60k queries of 60-word documents; 370 MB in chunks), ~7 GB extrapolated to MS MARCO's 500k training queries.
CHUNK_ROWS = 8192


def _to_dataset(rows: Iterable[list], columns: list[str]) -> Optional[Dataset]:
    """The rows (one value per column each) as a Dataset, built CHUNK_ROWS rows at a time; None for no rows."""
    chunks, rows = [], iter(rows)
    while chunk := list(itertools.islice(rows, CHUNK_ROWS)):
        chunks.append(Dataset.from_dict({name: [row[i] for row in chunk] for i, name in enumerate(columns)}))
        del chunk
    if not chunks:
        return None
    return chunks[0] if len(chunks) == 1 else concatenate_datasets(chunks)


POSITIVE_CHOICES = ("random", "bm25")


def check_sampling(num_negatives, seed, minimum: int, why: str = "") -> None:
    if not is_int(num_negatives) or num_negatives < minimum:
        raise ValueError(f"num_negatives must be an int >= {minimum}{why}, got {num_negatives!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _blank(text: str) -> bool:
    return not text.strip()


def _warn_left_out(source: str, left_out: list[str], what: str) -> None:
    if left_out:
        warnings.warn(f"{source}: {len(left_out)} example(s) left out (first: {left_out[0]}): {what} empty or "
                      "whitespace only", stacklevel=3)


def beir_examples(
    dataset: BEIRDataset, num_negatives: int = DEFAULT_NUM_NEGATIVES, seed: int = 0, with_ids: bool = False,
    positive: str = "random",
) -> Dataset:
    """One (query, positive, negatives) row per query of ``dataset.qrels`` that has a relevant document."""
    check_sampling(num_negatives, seed, minimum=0)
    if positive not in POSITIVE_CHOICES:
        raise ValueError(f"positive={positive!r} is not supported; choose one of {list(POSITIVE_CHOICES)}")
    relevant_of = {query_id: sorted(doc_id for doc_id, rel in judged.items() if rel > 0 and doc_id in dataset.corpus)
                   for query_id, judged in sorted(dataset.qrels.items())}
    bm25 = {}
    if positive == "bm25":
        from fles1.bm25 import bm25_scores

        bm25 = bm25_scores(dataset, relevant_of)
    rng = random.Random(seed)
    doc_ids = sorted(dataset.corpus)
    left_out = []
    # judged, but only as non-relevant (grade 0) or with relevant documents the corpus lacks: no positive to train on
    without_relevant = [query_id for query_id, relevant in relevant_of.items() if not relevant]

    def rows():  # one row per query, drawn in query order: the same seed gives the same rows
        for query_id, relevant in relevant_of.items():
            judged = dataset.qrels[query_id]
            if not relevant:
                continue
            # a blank relevant document is no positive to draw, yet still judged: masked as an in-batch negative
            positives = [doc_id for doc_id in relevant if not _blank(dataset.document_text(doc_id))]
            if not positives or _blank(dataset.queries[query_id]):
                left_out.append(f"query {query_id!r}")
                continue
            # nor the document with the query's own id: eval drops it from every ranking (BEIR's convention)
            own = query_id in dataset.corpus and query_id not in judged
            unjudged = len(doc_ids) - sum(doc_id in dataset.corpus for doc_id in judged) - own
            if unjudged < num_negatives:
                raise ValueError(f"{dataset.name}: query {query_id!r} leaves {unjudged} unjudged "
                                 f"documents, too few for {num_negatives} negatives")
            negatives = []
            while len(negatives) < num_negatives:
                doc_id = doc_ids[rng.randrange(len(doc_ids))]
                if doc_id not in judged and doc_id != query_id and doc_id not in negatives:
                    negatives.append(doc_id)
            chosen = positives[rng.randrange(len(positives))]  # drawn in both modes: same rng stream
            scored = [doc_id for doc_id in positives if doc_id in bm25.get(query_id, {})]
            if scored:
                chosen = max(scored, key=lambda doc_id: bm25[query_id][doc_id])
            row = [dataset.queries[query_id]] + [dataset.document_text(d) for d in [chosen] + negatives]
            yield row + [{"documents": [chosen] + negatives, "relevant": relevant}] * bool(with_ids)

    columns = _columns(num_negatives) + ["relevance"] * bool(with_ids)
    examples = _to_dataset(rows(), columns)
    source = f"{dataset.name} ({dataset.split})"
    _warn_left_out(source, left_out, "its query, or every relevant document, is")
    if without_relevant and examples is not None:  # (with no example at all, the error below says it)
        warnings.warn(f"{source}: {len(without_relevant)} judged quer(ies) without a relevant document (grade > 0) in "
                      f"the corpus, no training example (first: {without_relevant[0]!r})", stacklevel=2)
    if examples is None:
        why = "every query with a relevant document was left out: its query or its relevant documents are blank" \
            if left_out else "no query has a relevant document"
        raise ValueError(f"{source}: no training examples ({why})")
    return examples


def is_triples_header(row: list[str]) -> bool:
    """Whether a triples file's first row names its columns (query / positive / negative and the usual variants)."""
    names = [field.strip().lower() for field in row]
    return len(names) == 3 and names[0] in ("query", "queries", "question", "anchor", "q", "qid", "query_id",
                                            "query-id") \
        and "pos" in names[1] and "neg" in names[2]


def read_triples(path: str) -> list[tuple[int, str, str, str]]:
    """(line number, query, positive, negative) per row of the file; a header row is skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: triples file not found")
    triples = []
    with open(path, "rb") as handle:
        for number, row in tsv_rows(path, handle, error=ValueError, quoting=csv.QUOTE_NONE):
            if not row or (not triples and is_triples_header(row)):
                continue
            if len(row) != 3:
                raise ValueError(f"{path}:{number}: expected 3 tab-separated columns (query, positive, negative), "
                                 f"got {len(row)}")
            triples.append((number, row[0], row[1], row[2]))
    if triples and all(field.strip().isdigit() for _, *fields in triples for field in fields):
        raise ValueError(f"{path}: every row is three numbers: id triples (MS MARCO's qidpidtriples), not texts; "
                         "replace the ids by their texts (queries.tsv, collection.tsv) first")
    return triples


def triples_examples(path: str, num_negatives: int = DEFAULT_NUM_NEGATIVES, seed: int = 0) -> Dataset:
    """One row per triple; negatives beyond the triple's own are drawn from the other triples' passages. A row whose
    own negative the file calls relevant to its query (its positive, or another row's for the same query) gets a
    drawn negative in its place, with a warning; one whose query or positive is blank is left out, with a warning."""
    check_sampling(num_negatives, seed, minimum=1, why=" for triples (each row brings one)")
    triples, blank = [], []
    for row in read_triples(path):
        (blank if _blank(row[1]) or _blank(row[2]) else triples).append(row)
    _warn_left_out(path, [f"line {number}" for number, *_ in blank], "its query or positive is")
    if not triples:
        raise ValueError(f"{path}: no training examples (no query <tab> positive <tab> negative row)")
    pool = sorted({text for _, _, positive, negative in triples for text in (positive, negative)})
    positives_of = {}  # query -> every passage a triple calls relevant to it: none is drawn as its negative
    for _, query, positive, _ in triples:
        positives_of.setdefault(query, set()).add(positive)
    rng = random.Random(seed)
    rows, judged = [], []
    for number, query, positive, negative in triples:
        excluded = positives_of[query] | {negative}
        if len(pool) - len(excluded) < num_negatives - (negative not in positives_of[query]):
            raise ValueError(f"{path}:{number}: the row's query has {len(pool) - len(excluded)} passages left to draw "
                             f"from (of {len(pool)} distinct, less its positives and its own negative), too few for "
                             f"{num_negatives} negatives")
        # a negative the file itself calls relevant to the query (the row's positive, or another row's) would be
        # scored as a non-match: a drawn passage takes its place
        negatives = [] if negative in positives_of[query] else [negative]
        if not negatives:
            judged.append(number)
        while len(negatives) < num_negatives:
            text = pool[rng.randrange(len(pool))]
            if text not in excluded and text not in negatives:
                negatives.append(text)
        rows.append([query, positive] + negatives)
    if judged:
        warnings.warn(f"{path}: {len(judged)} row(s) (first: line {judged[0]}) give as negative a passage the file "
                      "calls relevant to the same query; a random passage was drawn in its place", stacklevel=2)
    return _to_dataset(rows, _columns(num_negatives))  # never None: at least one triple


def triples_file(source: str) -> Optional[str]:
    """The triples TSV `source` names (a file, or a folder holding triplets/raw.tsv and no BEIR corpus), else None:
    a BEIR folder or hub id."""
    folder_triples = os.path.join(source, "triplets", "raw.tsv")
    if os.path.isfile(source):
        return source
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "corpus.jsonl")) \
            and os.path.isfile(folder_triples):
        return folder_triples
    return None


def load_training_examples(
    source: str, split: str = "train", num_negatives: int = DEFAULT_NUM_NEGATIVES, seed: int = 0,
    with_ids: bool = False, positive: str = "random",
) -> Dataset:
    """BEIR folder / hub id, triples TSV or a folder with ``triplets/raw.tsv`` -> training ``Dataset``. ``with_ids``
    and ``positive="bm25"`` need a BEIR source's judgements: refused for triples, not silently dropped."""
    triples = triples_file(source)
    if triples is not None:
        unusable = [f"positive={positive!r} (data.positive)"] * (positive != "random") + \
            ["mask_false_negatives=True (data.mask_false_negatives)"] * bool(with_ids) + \
            [f"split={split!r} (data.split)"] * (split != "train")  # one file: it was trained on, split unheard
        if unusable:
            raise ValueError(f"{triples}: a triples TSV has no relevance judgements or splits, which "
                             f"{' and '.join(unusable)} need: use a BEIR source, or leave them at their defaults")
        if is_int(num_negatives) and num_negatives < 1:
            raise ValueError(f"{triples}: a triples source needs num_negatives >= 1 (data.num_negatives; each row "
                             f"brings its own negative), got {num_negatives!r}")
        try:
            return triples_examples(triples, num_negatives, seed)
        except OSError as error:  # unreadable: named as the data's, not (by the CLI) the model's
            raise ValueError(f"data.source={source!r}: {error}") from error
    try:
        dataset = load_beir(source, split)
    except BEIRDataError:
        raise
    except Exception as error:  # hub ids: no network, unknown id, ...
        raise ValueError(
            f"{source!r}: not a BEIR folder, a triples TSV or a loadable hub dataset ({type(error).__name__}: {error})"
        ) from error
    return beir_examples(dataset, num_negatives, seed, with_ids=with_ids, positive=positive)
