"""Exact sparse retrieval over an inverted index of document vectors (scipy.sparse), BEIR conventions.

The index is the transposed document matrix in CSR form: row ``t`` is the posting list of vocabulary term ``t``
(doc positions + weights). A query's scores are ``q @ postings``, which reads only the posting lists of the
query's terms -- the same work an inverted-index engine does, with exact float32 dot products.

    >>> from fles1.retrieval import InvertedIndex
    >>> index = InvertedIndex(doc_matrix, doc_ids)              # doc_matrix: csr (num_docs, vocab)
    >>> hits = index.search(query_matrix, k=1000)               # [(doc positions, scores)] per query
    >>> run = index.to_run(query_ids, hits, drop_self=True)     # {qid: {doc_id: score}}, BEIR's run dict
    >>> index.save("nfcorpus.index.npz"); InvertedIndex.load("nfcorpus.index.npz")
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Sequence

import numpy as np
from scipy.sparse import csr_matrix, issparse

from fles1.atomic import atomic_open
from fles1_encoder import passes_threshold

# Saved indices hold float16 weights: |w16 - w| <= 2**-11 |w| (round to nearest) for |w| >= 2**-14, float16's
# smallest normal number; below it the error is at most 2**-25 absolute (subnormals; at threshold 0 a few weights
# are that small). So any score moves by at most ~that fraction and two documents can only swap when their exact
# scores are within ~2**-10 of each other (ties at that resolution).
INDEX_FORMAT = "fles1-inverted-index/1"


def apply_threshold(matrix: csr_matrix, threshold: float) -> csr_matrix:
    """Keep entries >= threshold (> 0 when threshold is 0): FLES1Encoder's rule, applied to cached vectors."""
    matrix = csr_matrix(matrix, dtype=np.float32)
    keep = passes_threshold(matrix.data, threshold)
    # compact arrays of the kept entries (eliminate_zeros on a copy kept buffers of the input's size)
    kept_before = np.concatenate([[0], np.cumsum(keep, dtype=matrix.indptr.dtype)])
    return csr_matrix((matrix.data[keep], matrix.indices[keep], kept_before[matrix.indptr]), shape=matrix.shape)


def average_nnz(matrix: csr_matrix) -> float:
    return float(matrix.getnnz(axis=1).mean()) if matrix.shape[0] else 0.0


def check_k(k) -> None:
    """A hit count: an int >= 1 (2.5 was numpy's TypeError, True one hit, 0 every hit)."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")


def run_entry(query_id: str, doc_ids: Sequence[str], positions, scores, k: int | None, drop_self: bool) -> dict:
    """One query's run {doc_id: score} from its hits (doc positions, scores; best first): scores > 0 only, the
    document with the query's own id dropped (BEIR's convention; both str, as the run file writes them), k at most."""
    ranked = {}
    for position, score in zip(np.asarray(positions).tolist(), np.asarray(scores).tolist()):
        doc_id = doc_ids[position]
        if score <= 0 or (drop_self and doc_id == query_id):
            continue
        ranked[doc_id] = float(score)
        if k is not None and len(ranked) == k:
            break
    return ranked


def top_k_rows(scores: csr_matrix, k: int, tie_ranks: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row of a sparse score matrix: the k highest positive entries, score descending then ``tie_ranks[position]``
    ascending (default: position ascending). Entries not stored or stored as zero (no shared term) are never hits."""
    hits = []
    for row in range(scores.shape[0]):
        start, end = scores.indptr[row], scores.indptr[row + 1]
        positions, values = scores.indices[start:end], scores.data[start:end]
        keep = values > 0
        positions, values = positions[keep], values[keep]
        if len(values) > k:
            part = np.argpartition(-values, k - 1)[:k]
            # argpartition splits ties at the k-th score arbitrarily: keep every tied candidate, cut after sorting
            part = np.flatnonzero(values >= values[part].min())
            positions, values = positions[part], values[part]
        order = np.lexsort((positions if tie_ranks is None else tie_ranks[positions], -values))[:k]
        hits.append((positions[order].astype(np.int64), values[order].astype(np.float32)))
    return hits


def _check_unique(doc_ids: tuple[str, ...]) -> None:
    """One row per id: a run maps each id to one score, so a repeated id (passages indexed under their document's
    id) would keep whichever hit came last, not its best."""
    if len(set(doc_ids)) != len(doc_ids):
        seen = set()
        repeated = next(doc_id for doc_id in doc_ids if doc_id in seen or seen.add(doc_id))
        raise ValueError(f"doc_ids must be unique: {repeated!r} names more than one row (index passages under "
                         "ids of their own, e.g. 'doc#0', and merge their hits per document after search)")


class InvertedIndex:
    """Posting lists over a corpus of sparse vectors; exact dot-product top-k search.

    Args:
        doc_matrix: (num_docs, vocab) scipy CSR, e.g. ``FLES1Encoder.encode_batch(..., output="csr")``.
        doc_ids: the corpus ids, one per row.
    """

    query_chunk_size = 256  # queries scored at once: bounds the (queries x docs) score matrix

    def __init__(self, doc_matrix: csr_matrix, doc_ids: Sequence[str]):
        if doc_matrix.shape[0] != len(doc_ids):
            raise ValueError(f"doc_matrix has {doc_matrix.shape[0]} rows but {len(doc_ids)} doc_ids were given")
        self.doc_ids = doc_ids
        self.vocab_size = doc_matrix.shape[1]
        self.postings = csr_matrix(doc_matrix, dtype=np.float32).T.tocsr()  # (vocab, num_docs)
        self.postings.sort_indices()

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

    @property
    def num_postings(self) -> int:
        return int(self.postings.nnz)

    def doc_matrix(self) -> csr_matrix:
        return self.postings.T.tocsr()

    def score(self, query_matrix: csr_matrix) -> csr_matrix:
        """(num_queries, num_docs) sparse scores; a document sharing no term with the query has no entry."""
        self._check_queries(query_matrix)
        return (csr_matrix(query_matrix, dtype=np.float32) @ self.postings).tocsr()

    def search(self, query_matrix: csr_matrix, k: int = 1000) -> list[tuple[np.ndarray, np.ndarray]]:
        """Exact top-k per query row: [(doc positions, scores)], best first; equal scores in trec_eval's order (doc
        id descending), also where a tie straddles the k-th place, so the cut keeps what trec_eval would rank."""
        check_k(k)
        self._check_queries(query_matrix)
        if issparse(query_matrix) and query_matrix.format != "csr":  # COO cannot be sliced
            query_matrix = query_matrix.tocsr()
        hits = []
        for start in range(0, query_matrix.shape[0], self.query_chunk_size):
            hits += top_k_rows(self.score(query_matrix[start : start + self.query_chunk_size]), k, self._tie_ranks())
        return hits

    def _check_queries(self, query_matrix) -> None:
        if len(query_matrix.shape) != 2:  # one dense vector: its shape[1] was an IndexError
            raise ValueError(f"query vectors must be a (num_queries, {self.vocab_size}) matrix, got shape "
                             f"{tuple(query_matrix.shape)} (one vector: reshape it to (1, {self.vocab_size}))")
        if query_matrix.shape[1] != self.vocab_size:
            raise ValueError(f"query vectors have {query_matrix.shape[1]} dims, the index {self.vocab_size}")

    @property
    def doc_ids(self) -> tuple[str, ...]:
        """The corpus ids, one per row (a tuple: the tie order below is derived from them once)."""
        return self._doc_ids

    @doc_ids.setter
    def doc_ids(self, ids) -> None:
        ids = tuple(str(doc_id) for doc_id in ids)
        _check_unique(ids)
        self._doc_ids = ids
        self.__dict__.pop("_tie_rank_array", None)

    def _tie_ranks(self) -> np.ndarray:
        """Per document position, its place in doc-id descending order (Python's str order: code points, as
        trec_eval's strcmp on UTF-8; numpy's str arrays would drop trailing NULs), built once per id list."""
        ranks = self.__dict__.get("_tie_rank_array")
        if ranks is None:
            order = sorted(range(self.num_docs), key=self._doc_ids.__getitem__, reverse=True)
            ranks = np.empty(self.num_docs, dtype=np.int64)
            ranks[order] = np.arange(self.num_docs)
            self._tie_rank_array = ranks
        return ranks

    def to_run(
        self, query_ids: Sequence[str], hits, k: int | None = None, drop_self: bool = True
    ) -> dict[str, dict[str, float]]:
        """BEIR run dict {qid: {doc_id: score}}. BEIR drops a hit whose id equals the query id (search with
        k + 1 to keep k hits). Every query gets an entry, possibly empty (it then scores 0); `hits` holds one entry
        per query id, as `search` returns them for the query rows."""
        if k is not None:
            check_k(k)
        query_ids, hits = list(query_ids), list(hits)  # any iterables, as zip took them
        if len(query_ids) != len(hits):  # zip would drop the queries past the shorter one
            raise ValueError(f"{len(query_ids)} query ids for {len(hits)} hit lists (one per query row)")
        return {str(query_id): run_entry(str(query_id), self.doc_ids, positions, scores, k, drop_self)
                for query_id, (positions, scores) in zip(query_ids, hits)}

    # ---- on disk -----------------------------------------------------------------------------------------------
    def save(self, path: str) -> int:
        """Compact on-disk index (compressed npz): per term its posting list as doc-position gaps (uint16 when the
        corpus has < 65,536 docs) and float16 weights, plus the doc ids. Written atomically; returns bytes."""
        postings = self.postings
        lengths = np.diff(postings.indptr)
        terms = np.flatnonzero(lengths)
        positions = postings.indices
        gaps = np.empty(len(positions), dtype=np.int32)  # doc positions < 2**31: int32 deltas, no int64 copy
        np.subtract(positions[1:], positions[:-1], out=gaps[1:])
        starts = postings.indptr[:-1][lengths > 0]
        gaps[starts] = positions[starts]  # first posting of each list is absolute
        gap_dtype = np.uint16 if self.num_docs < 2**16 else np.uint32
        term_dtype = np.uint16 if self.vocab_size < 2**16 else np.uint32
        # doc ids as a JSON list: BEIR ids are any string (one holding a newline split the older "\n"-joined list)
        header = {"format": INDEX_FORMAT, "num_docs": self.num_docs, "vocab_size": self.vocab_size, "doc_ids": "json"}
        arrays = {
            "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            "doc_ids": np.frombuffer(json.dumps(self.doc_ids, ensure_ascii=False).encode("utf-8"), dtype=np.uint8),
            "terms": terms.astype(term_dtype),
            "lengths": lengths[terms].astype(np.uint32),
            "gaps": gaps.astype(gap_dtype),
            "weights": postings.data.astype(np.float16),
        }
        with atomic_open(path, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        return os.path.getsize(path)

    @classmethod
    def load(cls, path: str) -> "InvertedIndex":
        with np.load(path) as arrays:
            header = json.loads(arrays["header"].tobytes().decode())
            if header.get("format") != INDEX_FORMAT:
                raise ValueError(f"{path}: not a {INDEX_FORMAT} file (format {header.get('format')!r})")
            text = arrays["doc_ids"].tobytes().decode("utf-8")
            if header.get("doc_ids") == "json":
                doc_ids = json.loads(text)
            else:  # written before the JSON list
                doc_ids = text.split("\n") if header["num_docs"] else []
            lengths = arrays["lengths"].astype(np.int64)
            positions = arrays["gaps"].astype(np.int32)  # decoded in place below: peak ~2x the loaded postings
            weights = arrays["weights"].astype(np.float32)
            terms = arrays["terms"].astype(np.int64)
        if len(doc_ids) != header["num_docs"]:
            raise ValueError(f"{path}: {len(doc_ids)} doc ids for {header['num_docs']} documents")
        index_dtype = np.int32 if len(positions) < 2**31 else np.int64  # scipy's own choice: no conversion copy
        indptr = np.zeros(header["vocab_size"] + 1, dtype=np.int64)
        indptr[terms + 1] = lengths
        indptr = np.cumsum(indptr).astype(index_dtype)
        if len(positions):
            # undo the gaps with one running sum over all lists: each list's absolute first position becomes its
            # step from the previous list's last one (a list's sum of gaps is its last position)
            starts = indptr[terms]
            last = np.add.reduceat(positions, starts)
            positions[starts[1:]] -= last[:-1]
            np.cumsum(positions, out=positions)
        postings = csr_matrix((weights, positions.astype(index_dtype, copy=False), indptr),
                              shape=(header["vocab_size"], header["num_docs"]), copy=False)
        index = cls.__new__(cls)
        index.doc_ids, index.vocab_size, index.postings = doc_ids, header["vocab_size"], postings
        return index
