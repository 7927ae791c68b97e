"""Exports of FLES-1 document vectors for inverted-index engines.

Elasticsearch / OpenSearch: a ``rank_features`` field. A feature name is a map key under that field, and the
engines reject keys containing ``.`` (an object path) and empty keys; WordPiece has tokens like ``.``, ``...``,
``u.s``. :func:`feature_name` escapes ``%`` and ``.`` percent-style (``.`` -> ``%2E``), reversibly and without
collisions; use the same function on the query side (:func:`elasticsearch_query` does).

    >>> from fles1.exports import elasticsearch_query, write_elasticsearch
    >>> write_elasticsearch(out_dir, "nfcorpus", doc_ids, doc_matrix, vocab)   # mapping.json + bulk-00001.ndjson ...
    >>> elasticsearch_query({"machine": 1.39, "u.s": 0.8})                      # bool/should of rank_feature

``rank_features`` stores each value with 9 significant bits (Lucene's FeatureField), so every document weight the
engine scores is within 2^-8 relative of the exported one (queries' boosts are exact): near-ties can swap. The
bulk body is cut into parts of at most ES_BULK_PART_BYTES: one request each (the engines refuse a request over
``http.max_content_length``, 100 MB by default, and advise far smaller bulks).

Pyserini / Anserini: ``JsonVectorCollection`` lines ``{"id", "contents", "vector": {token: int impact}}``,
indexed with ``python -m pyserini.index.lucene --collection JsonVectorCollection --impact --pretokenized``.
Impacts are ``round(weight * scale)`` (scale 100, SPLADE's convention); queries are quantized the same way
(:func:`quantize`) and written as Anserini's impact topics (:func:`write_anserini_queries`). Rounding to
nearest bounds every score's error (:func:`impact_error_bound`), so the quantized top-10 differs from the exact
one only between documents whose exact scores are within that bound of each other -- ties at the impact
resolution (tests/test_eval_exports.py checks this on nfcorpus).
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from typing import Sequence

import numpy as np
from scipy.sparse import csr_matrix

from fles1.atomic import atomic_open, atomic_write_json

IMPACT_SCALE = 100
RANK_FEATURES_FIELD = "tokens"
FLOAT32_MIN_NORMAL = float(np.finfo(np.float32).tiny)  # the smallest rank_features value (Float.MIN_NORMAL)
ES_WEIGHT_DIGITS = 6  # significant digits: rank_features keeps 9 significant bits anyway; more only cost bytes
ES_MAX_ID_BYTES = 512  # Elasticsearch / OpenSearch refuse a longer _id (that bulk item fails)
ES_BULK_PART_BYTES = 16 * 1024 * 1024  # per bulk request: a tenth of the default http.max_content_length
# the collection has a folder of its own: Anserini reads every file of --input as documents
ANSERINI_INDEX_COMMAND = ("python -m pyserini.index.lucene --collection JsonVectorCollection --input "
                          "pyserini/collection --index INDEX --generator DefaultLuceneDocumentGenerator --impact "
                          "--pretokenized")
# -removeQuery drops a document whose id is the query's, as eval does (BEIR's convention) -- but after the -hits cut
# (AbstractSearcher.processLuceneTopDocs): with 1001 a query keeps 1000 other documents where its id is a document's
# (1000 was 999), 1001 elsewhere; eval and the Elasticsearch query keep 1000, and every metric cuts at <= 1000.
# ANSERINI_JAR: Anserini's fatjar (its bin/run.sh only runs from an Anserini build root).
ANSERINI_SEARCH_COMMAND = ("java -cp ANSERINI_JAR io.anserini.search.SearchCollection -index INDEX -topics "
                           "pyserini/queries.tsv -topicReader TsvString -output run.trec -impact -pretokenized "
                           "-removeQuery -hits 1001")
# where a dataset's own-id documents are kept (`fles1.evaluation.own_id_judgements`): no -removeQuery, 1000 hits
ANSERINI_SEARCH_COMMAND_KEEPING_OWN_IDS = ANSERINI_SEARCH_COMMAND.replace(" -removeQuery -hits 1001", " -hits 1000")
# the commands' relative paths start in the dataset's export folder, the one holding pyserini/ and elasticsearch/
ANSERINI_RUN_FROM = "the dataset's export folder (DIR/<dataset>, holding pyserini/ and elasticsearch/)"
# Elasticsearch / OpenSearch over HTTP (curl 7.76+ for --fail-with-body, and jq; POSIX sh or bash); $ES is the
# server's URL and INDEX the index (export.json puts its name in). Each command exits non-zero on the first refusal --
# an index that exists already, a bulk request with a failed item (every bulk response is kept in
# elasticsearch-bulk-responses.ndjson), a search error -- so that `create && index && search` stops there instead of
# searching a short index; each runs in a subshell, so that pasted into a terminal its `exit` ends only itself.
# Refreshed after the bulk requests, so that the searches see every document; each search response is written as
# "<query id>\t<response JSON>", one line per query (ids hold no whitespace).
_ES_SET = ': "${ES:?set ES to the server URL, e.g. http://localhost:9200}"'
ELASTICSEARCH_COMMANDS = {
    "create_index_command": f"{_ES_SET} && curl -sS --fail-with-body -XPUT \"$ES/INDEX\" "
                            "-H 'Content-Type: application/json' --data-binary @elasticsearch/mapping.json",
    # an empty part (an empty corpus) is skipped: the engines refuse an empty bulk body
    "index_command": f"{_ES_SET} && ( rm -f elasticsearch-bulk-responses.ndjson; "
                     "for part in elasticsearch/bulk-*.ndjson; do [ -s \"$part\" ] || continue; "
                     "rm -f elasticsearch-bulk-response.json; "
                     "curl -sS --fail-with-body -XPOST \"$ES/_bulk\" -H 'Content-Type: application/x-ndjson' "
                     "--data-binary @\"$part\" -o elasticsearch-bulk-response.json; sent=$?; "
                     "jq -c . elasticsearch-bulk-response.json >> elasticsearch-bulk-responses.ndjson 2> /dev/null; "
                     "[ $sent -eq 0 ] && jq -e '.errors == false' elasticsearch-bulk-response.json > /dev/null "
                     "|| { rm -f elasticsearch-bulk-response.json; echo \"$part: refused, or some of its documents "
                     "were (elasticsearch-bulk-responses.ndjson)\" >&2; exit 1; }; done; "
                     "rm -f elasticsearch-bulk-response.json ) "
                     "&& curl -sS --fail-with-body -XPOST \"$ES/INDEX/_refresh\"",
    # the body through stdin: a query at threshold 0 (every term) is past the 128 KiB one argument may have
    "search_command": f"{_ES_SET} && ( jq -r '.id, (.body | tojson)' elasticsearch/queries.jsonl "
                      "> elasticsearch-search-bodies.txt || exit 1; failed=; while read -r id && read -r body; do "
                      "printf '%s\\t' \"$id\"; printf '%s' \"$body\" | curl -sS --fail-with-body -XPOST "
                      "\"$ES/INDEX/_search\" -H 'Content-Type: application/json' --data-binary @- "
                      "|| { failed=1; break; }; echo; done < elasticsearch-search-bodies.txt "
                      "> elasticsearch-responses.tsv; rm -f elasticsearch-search-bodies.txt; [ -z \"$failed\" ] )",
}


def elasticsearch_commands(index_name: str) -> dict:
    """`ELASTICSEARCH_COMMANDS` for the index `index_name`, percent-encoded: an index name may hold characters a
    URL reserves (``&``, ``%``, non-ASCII) or a shell expands in double quotes (``$``, a backquote)."""
    path = urllib.parse.quote(index_name, safe="")
    return {step: command.replace("INDEX", path) for step, command in ELASTICSEARCH_COMMANDS.items()}


def feature_name(token: str) -> str:
    """A vocabulary token as an Elasticsearch/OpenSearch ``rank_features`` key (no '.', never empty)."""
    if not token:
        raise ValueError("empty token: rank_features keys must be non-empty")
    return token.replace("%", "%25").replace(".", "%2E")


def token_from_feature_name(name: str) -> str:
    return name.replace("%2E", ".").replace("%25", "%")


def _checked_weights(matrix, what: str) -> csr_matrix:
    """`matrix` as CSR, refused when a weight is negative or not finite (naming the first): SPLADE weights are >= 0,
    and the writers treated such entries apart -- Elasticsearch's left them out, the Anserini files wrote negative
    impacts and queries of nothing but negative weights as the empty line that stops Anserini's whole search."""
    matrix = csr_matrix(matrix)
    bad = np.flatnonzero(~(np.isfinite(matrix.data) & (matrix.data >= 0)))
    if len(bad):
        row = int(np.searchsorted(matrix.indptr, bad[0], side="right")) - 1
        raise ValueError(f"{what}: row {row} has the weight {float(matrix.data[bad[0]])!r} (column "
                         f"{matrix.indices[bad[0]]}); the exports take weights >= 0, as FLES-1 vectors are")
    return matrix


def _rows(matrix: csr_matrix, ids: Sequence[str], vocab: Sequence[str], what: str):
    """(term ids, weights) per row of `matrix` (its weights checked already: `_checked_weights`, or `quantize`), one
    row per id of `ids`, checked before anything is written (a mismatch was cut silently by zip)."""
    matrix = csr_matrix(matrix)
    if len(ids) != matrix.shape[0]:
        raise ValueError(f"{what}: {len(ids)} ids for a matrix of {matrix.shape[0]} rows (one id per row)")
    if len(vocab) < matrix.shape[1]:
        raise ValueError(f"{what}: a vocabulary of {len(vocab)} terms for a matrix of {matrix.shape[1]} columns")
    bounds = matrix.indptr
    return ((matrix.indices[bounds[row] : bounds[row + 1]], matrix.data[bounds[row] : bounds[row + 1]])
            for row in range(matrix.shape[0]))


def elasticsearch_mapping(field: str = RANK_FEATURES_FIELD) -> dict:
    """Index body for ``PUT /<index>``: the vector in a ``rank_features`` field, the id as keyword."""
    return {"mappings": {"properties": {"id": {"type": "keyword"}, field: {"type": "rank_features"}}}}


def elasticsearch_query(vector: dict[str, float], field: str = RANK_FEATURES_FIELD,
                        exclude_id: str | None = None) -> dict:
    """Query body scoring sum_t q_t * d_t: one ``rank_feature`` clause per query term, linear, boosted by q_t. An
    empty vector matches nothing (a ``bool`` without clauses would match every document); ``exclude_id`` leaves
    out the document of that id (BEIR's convention: a query never retrieves itself)."""
    should = [
        {"rank_feature": {"field": f"{field}.{feature_name(token)}", "linear": {}, "boost": float(weight)}}
        for token, weight in vector.items()
        if weight > 0
    ]
    if not should:
        return {"query": {"match_none": {}}}
    query = {"should": should}
    if exclude_id is not None:
        query["must_not"] = [{"ids": {"values": [exclude_id]}}]
    return {"query": {"bool": query}}


def elasticsearch_index_name(name: str) -> str:
    """``name`` as Elasticsearch accepts an index name: lowercase, none of ``\\ / * ? " < > | , # :`` or spaces
    (each becomes ``-``), not starting with ``- _ +``, not ``.`` / ``..``, at most 255 bytes."""
    cleaned = re.sub(r'[\\/*?"<>|,#: ]', "-", name.lower()).lstrip("-_+")
    cleaned = cleaned.encode("utf-8")[:255].decode("utf-8", "ignore")
    return cleaned if cleaned.strip(".") else "fles1"


def check_elasticsearch_ids(doc_ids, what: str) -> None:
    """Every id can be an Elasticsearch/OpenSearch ``_id`` (1 to 512 UTF-8 bytes): else its bulk item would fail
    and the index would be short of documents."""
    for doc_id in doc_ids:
        size = len(doc_id.encode("utf-8"))
        if not 0 < size <= ES_MAX_ID_BYTES:
            raise ValueError(f"{what}: corpus id {doc_id[:40]!r}{'...' if len(doc_id) > 40 else ''} is {size} bytes; "
                             f"an Elasticsearch/OpenSearch _id takes 1 to {ES_MAX_ID_BYTES}: shorten it, or leave "
                             "out the export")


def write_elasticsearch(
    out_dir: str, index_name: str, doc_ids: Sequence[str], doc_matrix: csr_matrix, vocab: Sequence[str],
    field: str = RANK_FEATURES_FIELD, part_bytes: int = ES_BULK_PART_BYTES,
) -> dict:
    """``mapping.json`` and ``bulk-00001.ndjson``, ``bulk-00002.ndjson``, ... (one ``POST /_bulk`` each, at most
    `part_bytes`) in out_dir, each file atomically; returns {"mapping": path, "bulk": [paths]}. The actions name
    the index ``elasticsearch_index_name(index_name)`` (a dataset folder may be "NFCorpus Tiny")."""
    doc_ids = list(doc_ids)  # any iterable, as zip took them
    check_elasticsearch_ids(doc_ids, index_name)
    rows = _rows(_checked_weights(doc_matrix, "write_elasticsearch"), doc_ids, vocab, "write_elasticsearch")
    index_name = elasticsearch_index_name(index_name)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"mapping": os.path.join(out_dir, "mapping.json"), "bulk": []}
    atomic_write_json(paths["mapping"], elasticsearch_mapping(field))
    names = [feature_name(token) for token in vocab]
    part, size = [], 0

    def write_part():
        paths["bulk"].append(os.path.join(out_dir, f"bulk-{len(paths['bulk']) + 1:05d}.ndjson"))
        with atomic_open(paths["bulk"][-1], "wb") as handle:
            handle.writelines(part)

    for doc_id, (ids, weights) in zip(doc_ids, rows):
        features = {}
        for i, w in zip(ids.tolist(), weights.astype(np.float64).tolist()):
            w = float(f"{w:.{ES_WEIGHT_DIGITS}g}")  # significant digits: 6 decimals left 1.7e-6 at 2e-06 (+17%)
            if w >= FLOAT32_MIN_NORMAL:  # Lucene's FeatureField refuses the document otherwise: positive normal only
                features[names[i]] = w
        item = (json.dumps({"index": {"_index": index_name, "_id": doc_id}}) + "\n"
                + json.dumps({"id": doc_id, field: features}, ensure_ascii=False) + "\n").encode("utf-8")
        if part and size + len(item) > part_bytes:
            write_part()
            part, size = [], 0
        part.append(item)
        size += len(item)
    if part or not paths["bulk"]:  # an empty corpus: one empty part, so that the files say "nothing to index"
        write_part()
    return paths


def write_elasticsearch_queries(
    path: str, query_ids: Sequence[str], query_matrix: csr_matrix, vocab: Sequence[str], size: int = 1000,
    field: str = RANK_FEATURES_FIELD, exclude_own_id: bool = True,
) -> str:
    """JSONL, one line per query: ``{"id": query id, "body": ...}``, the body for ``POST /<index>/_search`` (the
    top `size` by `elasticsearch_query` of the query's vector, the query's own id left out as eval does unless
    ``exclude_own_id`` is False),
    atomically; returns the path."""
    query_ids = list(query_ids)  # any iterable, as zip took them
    rows = _rows(_checked_weights(query_matrix, "write_elasticsearch_queries"), query_ids, vocab,
                 "write_elasticsearch_queries")
    with atomic_open(path) as handle:
        for query_id, (ids, weights) in zip(query_ids, rows):
            vector = {vocab[i]: w for i, w in zip(ids.tolist(), weights.astype(np.float64).tolist())}
            # ids and scores are what a run needs: without "_source": false each hit carries its document's whole
            # vector (~5 KB on nfcorpus, ~5 MB a response at 1000 hits); no total count to track either
            body = {"size": size, "_source": False, "track_total_hits": False,
                    **elasticsearch_query(vector, field, exclude_id=query_id if exclude_own_id else None)}
            handle.write(json.dumps({"id": query_id, "body": body}, ensure_ascii=False) + "\n")
    return path


def empty_impact_rows(ids: Sequence[str], matrix: csr_matrix, scale: float = IMPACT_SCALE) -> list[str]:
    """The ids whose vectors have no impact >= 1 (an empty vector, or every weight < 0.5 / scale): queries
    `write_anserini_queries` leaves out, documents Anserini does not index (an empty text: EmptyDocumentException)."""
    rows = np.diff(quantize(matrix, scale).indptr)
    return [row_id for row_id, count in zip(ids, rows.tolist()) if count == 0]


def quantize(matrix: csr_matrix, scale: float = IMPACT_SCALE, *, what: str = "quantize") -> csr_matrix:
    """Integer impacts round(w * scale) (int32 CSR); weights rounding to 0 are dropped; weights must be >= 0 (a
    ValueError starting with `what` otherwise)."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    matrix = csr_matrix(_checked_weights(matrix, what), dtype=np.float64, copy=True)
    matrix.data = np.rint(matrix.data * scale)
    if len(matrix.data) and matrix.data.max() > np.iinfo(np.int32).max:  # wrapped to negative impacts
        raise ValueError(f"{what}: a weight of {matrix.data.max() / scale:g} at scale {scale:g} is past the int32 "
                         "impacts Lucene stores")
    matrix.eliminate_zeros()
    return matrix.astype(np.int32)


def impact_error_bound(query_matrix: csr_matrix, doc_matrix: csr_matrix, scale: float = IMPACT_SCALE) -> np.ndarray:
    """(queries, docs) dense bound on |quantized score / scale^2 - exact score| when both sides are rounded:
    per shared term |q d - Q D / s^2| <= (q + d) / (2 s) + 1 / (4 s^2)."""
    queries, docs = csr_matrix(query_matrix, dtype=np.float64), csr_matrix(doc_matrix, dtype=np.float64)
    query_mask, doc_mask = queries.copy(), docs.copy()
    query_mask.data[:], doc_mask.data[:] = 1.0, 1.0
    query_side = (queries @ doc_mask.T).toarray()  # sum of q_t over shared terms
    doc_side = (query_mask @ docs.T).toarray()  # sum of d_t over shared terms
    shared = (query_mask @ doc_mask.T).toarray()
    return (query_side + doc_side) / (2 * scale) + shared / (4 * scale**2)


def write_pyserini(
    path: str, doc_ids: Sequence[str], doc_matrix: csr_matrix, vocab: Sequence[str], scale: float = IMPACT_SCALE
) -> str:
    """``JsonVectorCollection`` JSONL with integer impacts, atomically; returns the path."""
    doc_ids = list(doc_ids)  # any iterable, as zip took them
    rows = _rows(quantize(doc_matrix, scale, what="write_pyserini"), doc_ids, vocab, "write_pyserini")
    with atomic_open(path) as handle:
        for doc_id, (ids, values) in zip(doc_ids, rows):
            vector = {vocab[i]: int(v) for i, v in zip(ids.tolist(), values.tolist())}
            handle.write(json.dumps({"id": doc_id, "contents": "", "vector": vector}, ensure_ascii=False) + "\n")
    return path


def write_anserini_queries(
    path: str, query_ids: Sequence[str], query_matrix: csr_matrix, vocab: Sequence[str], scale: float = IMPACT_SCALE
) -> str:
    """Anserini's impact topics, as its SPLADE regressions ship them: ``<query id>\\t<token> <token> ...``, each
    token repeated round(w * scale) times (``-topicReader TsvString -impact -pretokenized``; ANSERINI_SEARCH_COMMAND),
    atomically; returns the path. Query ids must hold no whitespace (`fles1.metrics.check_trec_ids`). A query
    whose impacts all round to 0 is left out (`empty_impact_rows` names them): Anserini's TsvString reader stops
    the whole search at a line without a text after its tab. An empty query matches nothing in eval either; one
    whose weights are all below 0.5 / scale (thresholds under 0.005) does match there."""
    query_ids = list(query_ids)  # any iterable, as zip took them
    rows = _rows(quantize(query_matrix, scale, what="write_anserini_queries"), query_ids, vocab,
                 "write_anserini_queries")
    with atomic_open(path) as handle:
        for query_id, (ids, values) in zip(query_ids, rows):
            if not len(ids):
                continue
            handle.write(query_id + "\t" + " ".join(" ".join([vocab[i]] * int(v)) for i, v in
                                                     zip(ids.tolist(), values.tolist())) + "\n")
    return path
