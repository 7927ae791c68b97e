"""BM25 baseline with bm25s: Lucene's BM25 over "title text", English stop words and a Snowball stemmer
(PyStemmer), the setup whose nfcorpus numbers sit next to Pyserini's (flat 0.3218, multifield 0.3254).

    >>> from fles1.beir import load_beir
    >>> from fles1.bm25 import bm25_run
    >>> dataset = load_beir("../shared/data/nfcorpus", "test")
    >>> run = bm25_run(dataset, sorted(dataset.qrels), k=1000)   # {qid: {doc_id: score}}
"""

from __future__ import annotations

from typing import Sequence

from fles1.retrieval import check_k, run_entry

BM25_SETTINGS = {"method": "lucene", "k1": 1.5, "b": 0.75}  # bm25s defaults: nfcorpus 0.3210 (Pyserini's 0.9/0.4: 0.3177)
STOPWORDS = "en"
STEMMER = "english"


def bm25_library() -> str:
    import bm25s

    settings = ", ".join(f"{key}={value}" for key, value in BM25_SETTINGS.items())
    return f"bm25s {bm25s.__version__} ({settings}, stopwords={STOPWORDS}, PyStemmer {STEMMER} snowball, title+text)"


def _bm25_index(dataset):
    """(retriever, doc_ids, vocab, stemmer) over the corpus' "title text"; retriever None when no document holds
    an indexable term (all empty, or stop words only: bm25s's index fails)."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer(STEMMER)
    doc_ids = list(dataset.corpus)
    corpus_tokens = bm25s.tokenize(
        [dataset.document_text(doc_id) for doc_id in doc_ids], stopwords=STOPWORDS, stemmer=stemmer, show_progress=False
    )
    vocab = corpus_tokens.vocab
    if not vocab:
        return None, doc_ids, vocab, stemmer
    retriever = bm25s.BM25(**BM25_SETTINGS)
    retriever.index(corpus_tokens, show_progress=False)
    return retriever, doc_ids, vocab, stemmer


def _check_query_ids(dataset, query_ids) -> None:
    if isinstance(query_ids, str):  # its characters would be taken for ids
        raise TypeError(f"query_ids must be a sequence of query ids, got one str {query_ids!r}: wrap it in a list")
    unknown = [qid for qid in query_ids if qid not in dataset.queries]
    if unknown:
        raise ValueError(f"{len(unknown)} query id(s) not in the dataset's queries, e.g. {unknown[0]!r}")


def _query_tokens(dataset, query_ids, vocab, stemmer) -> list[list[str]]:
    """Each query's terms the corpus holds: out-of-vocabulary terms cannot match (a query left with none has no
    hits; bm25s would return arbitrary zero-score documents)."""
    import bm25s

    tokens = bm25s.tokenize([dataset.queries[qid] for qid in query_ids], stopwords=STOPWORDS, stemmer=stemmer,
                            return_ids=False, show_progress=False)
    return [[token for token in query if token in vocab] for query in tokens]


def bm25_run(dataset, query_ids: Sequence[str], k: int = 1000, drop_self: bool = True) -> dict[str, dict[str, float]]:
    """Top-k BM25 hits per query, BEIR conventions: a hit with the query's own id is dropped, a query sharing no
    term with the corpus gets no hits (bm25s would return arbitrary zero-score documents)."""
    check_k(k)
    _check_query_ids(dataset, query_ids)
    retriever, doc_ids, vocab, stemmer = _bm25_index(dataset)
    run = {str(qid): {} for qid in query_ids}
    if retriever is None:
        return run
    query_tokens = _query_tokens(dataset, query_ids, vocab, stemmer)
    searchable = [i for i, tokens in enumerate(query_tokens) if tokens]
    if searchable:
        depth = min(k + 1, len(doc_ids))
        positions, scores = retriever.retrieve(
            [query_tokens[i] for i in searchable], k=depth, show_progress=False, n_threads=1
        )
        for row, i in enumerate(searchable):
            run[str(query_ids[i])] = run_entry(str(query_ids[i]), doc_ids, positions[row], scores[row], k, drop_self)
    return run


def bm25_scores(dataset, wanted: dict[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """BM25 scores of given documents per query, {qid: {doc_id: score}} for the scores > 0: one query's scores
    over the corpus at a time, so memory stays one corpus-length array (a full ranking per query grew with
    queries x documents: tens of GB for MS MARCO's training queries)."""
    _check_query_ids(dataset, wanted)
    retriever, doc_ids, vocab, stemmer = _bm25_index(dataset)
    scores = {str(qid): {} for qid in wanted}
    if retriever is None:
        return scores
    position = {doc_id: index for index, doc_id in enumerate(doc_ids)}
    query_ids = list(wanted)
    for qid, tokens in zip(query_ids, _query_tokens(dataset, query_ids, vocab, stemmer)):
        if not tokens:
            continue
        row = retriever.get_scores(tokens)
        scores[str(qid)] = {doc_id: float(row[position[doc_id]]) for doc_id in wanted[qid]
                            if row[position[doc_id]] > 0}
    return scores
