"""BEIR-layout data: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

A local folder is read line by line so that a malformed line is reported with its file and line number;
a name that is not a folder is treated as a Hugging Face hub dataset id (``BeIR/nfcorpus``) and loaded with
``datasets`` (qrels from ``<id>-qrels``, BEIR's convention).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from fles1.metrics import relevance_grade
from fles1_encoder import lone_surrogate


class BEIRDataError(ValueError):
    """Bad BEIR data; the message names the file (and line) at fault."""


class BEIRSplitError(BEIRDataError):
    """The dataset has no qrels for the split asked for; the message names the splits it has."""


class BEIRDataWarning(UserWarning):
    """Data that loads, with a caveat (judged documents missing from the corpus)."""


@dataclass
class BEIRDataset:
    name: str
    corpus: dict[str, dict]  # doc id -> {"title": str, "text": str}
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    split: str
    fingerprint: str = field(default="")
    # (query id, doc id) judged relevant whose document is not in the corpus: kept in qrels (relevant documents no
    # run can retrieve, as BEIR and pytrec_eval count them; BEIR's ArguAna test qrels hold one)
    missing_documents: list[tuple[str, str]] = field(default_factory=list)
    hub_id: str = ""  # the Hub dataset it was loaded from; "" for a local folder

    def document_text(self, doc_id: str) -> str:
        """Title and text joined as BEIR's and sentence-transformers' evaluators do."""
        doc = self.corpus[doc_id]
        return f"{doc.get('title', '')} {doc.get('text', '')}".strip()


def utf8_lines(path: str, handle, error=BEIRDataError) -> Iterator[str]:
    """The lines of `handle` (`path` opened in binary mode) as str, without a leading byte-order mark. A line that is
    not UTF-8 raises `error` naming the file and line; a text-mode handle fails inside a buffer read and names
    neither."""
    for number, raw in enumerate(handle, start=1):
        if number == 1 and raw.startswith(b"\x1f\x8b"):  # gzip's magic bytes
            raise error(f"{path}: gzip-compressed; gunzip it first")
        try:  # a byte-order mark (Windows editors write one) opens the file; it is not part of the first line
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as bad:
            raise error(f"{path}:{number}: not UTF-8 (byte {raw[bad.start]:#04x} at {bad.start})") from None


def tsv_rows(path: str, handle, error=BEIRDataError, **reader_options) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a tab-separated file opened in binary mode. What the csv module refuses (a stray
    carriage return inside a field) raises `error` naming the file and line; fields have no size limit (the csv
    module's default 131,072 characters refused a long passage)."""
    csv.field_size_limit(2**31 - 1)  # process-wide, and only ever raised: the largest a C long holds everywhere
    reader = csv.reader(utf8_lines(path, handle, error=error), delimiter="\t", **reader_options)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as bad:
            if "new-line character seen in unquoted field" in str(bad):  # its universal-newline advice does not apply
                bad = "a carriage return inside a field (a line break of another system in the text?)"
            raise error(f"{path}:{reader.line_num}: {bad}") from None
        yield reader.line_num, row


def jsonl_path(path: str) -> str:
    """``path``, or ``path.gz`` when only that exists (how the BeIR hub repos store corpus and queries)."""
    return path if os.path.isfile(path) or not os.path.isfile(f"{path}.gz") else f"{path}.gz"


def opened(path: str, opener=None):
    """``opener(path, "rb")``; a file that exists but cannot be opened (permissions) is a BEIRDataError naming it --
    it was a traceback, exit 1."""
    try:
        return (opener or open)(path, "rb")
    except OSError as error:
        raise BEIRDataError(f"{path}: cannot be read ({error.strerror or error})") from None


def _read_jsonl(path: str, text_fields: tuple[str, ...]) -> list[dict]:
    """The file's JSON objects, each with an '_id', a 'text' and its `text_fields` as str ("" where null, or for a
    missing title). A ``.gz`` path is read through gzip."""
    if not os.path.isfile(path):
        raise BEIRDataError(f"{path}: file not found")
    rows = {}  # id -> (its first line number, row: _id and text fields)
    try:
        with opened(path, gzip.open if path.endswith(".gz") else None) as handle:
            _read_rows(path, handle, text_fields, rows)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:  # a .gz cut short, or not gzip at all
        raise BEIRDataError(f"{path}: not a readable gzip file ({error})") from None
    return [row for _, row in rows.values()]


def _read_rows(path: str, handle, text_fields: tuple[str, ...], rows: dict) -> None:
    """Each JSON line of `handle` into `rows` (id -> (its first line number, its id and text fields)), its errors
    naming file and line."""
    for number, line in enumerate(utf8_lines(path, handle), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise BEIRDataError(f"{path}:{number}: malformed JSON ({error.msg})") from None
        if not isinstance(row, dict) or "_id" not in row:
            raise BEIRDataError(f"{path}:{number}: expected a JSON object with an '_id'")
        keys = sorted(row)
        for name in text_fields:
            row[name] = _text_field(row.get(name), f"{path}:{number}: '{name}'")
        if "text" not in keys:  # a row keyed otherwise ("query", "contents") would encode as blank: every score 0
            raise BEIRDataError(f"{path}:{number}: no 'text' field (BEIR rows hold their text under 'text', null or "
                                f"\"\" for none; this one has {keys})")
        texts = {name: row[name] for name in ("_id", *text_fields)}  # the rest (metadata) would only be held
        _add_row(rows, _row_id(row["_id"], f"{path}:{number}"), texts, text_fields, f"{path}:{number}", number, "line")


def _row_id(value, where: str) -> str:
    """A row's '_id' as the str every id is compared as: a non-empty string, or an integer. null, true or a list
    would become the ids 'None', 'True', "['a']"."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise BEIRDataError(f"{where}: '_id' must be a non-empty string or an integer, got {value!r}")
    position = lone_surrogate(value) if isinstance(value, str) else None
    if position is not None:  # pytrec_eval's C code crashed the process on it, after the corpus was encoded
        raise BEIRDataError(f"{where}: '_id' holds a lone surrogate {value[position]!r} at character {position} "
                            "(a broken \\u escape)")
    if isinstance(value, str) and "\0" in value:  # pytrec_eval's C code cuts an id there: a KeyError after the encoding
        raise BEIRDataError(f"{where}: '_id' holds a NUL character (\\u0000) at character {value.index(chr(0))}")
    return str(value)


def _add_row(rows: dict, row_id: str, row: dict, text_fields, where: str, position: int, unit: str) -> None:
    """rows[row_id] = (position, row) unless already there with the same texts; two texts for one id would keep
    the last one silently (a repeated identical row is harmless). `unit` names the position ("line", "row")."""
    first_position, first = rows.setdefault(row_id, (position, row))
    if any(first[name] != row[name] for name in text_fields):
        raise BEIRDataError(f"{where}: _id {row_id!r} again, with another text (first at {unit} {first_position})")


def _text_field(value, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BEIRDataError(f"{where} is {type(value).__name__}, expected a string")
    position = lone_surrogate(value)
    if position is not None:
        raise BEIRDataError(f"{where} holds a lone surrogate {value[position]!r} at character {position} "
                            "(a broken \\u escape)")
    return value


def load_corpus(path: str) -> dict[str, dict]:
    corpus = {}
    for row in _read_jsonl(path, ("title", "text")):
        corpus[str(row["_id"])] = {"title": row["title"], "text": row["text"]}
    if not corpus:
        raise BEIRDataError(f"{path}: no documents")
    return corpus


def load_queries(path: str) -> dict[str, str]:
    return {str(row["_id"]): row["text"] for row in _read_jsonl(path, ("text",))}


def load_qrels(path: str, corpus: dict | None = None, queries: dict | None = None,
               missing_documents: list | None = None) -> dict[str, dict[str, int]]:
    """TREC-style BEIR qrels TSV (header ``query-id corpus-id score``). An unknown query id is an error; a corpus id
    not in ``corpus`` too, unless ``missing_documents`` (a list) collects those judgements (then kept, with a
    warning); a score must be an integer grade ("1" or "1.0"), an empty file (or a header alone) is an error."""
    if not os.path.isfile(path):
        raise BEIRDataError(f"{path}: file not found")
    qrels: dict[str, dict[str, int]] = {}
    with opened(path) as handle:  # never quoted: a '"' opening an id glued the next lines onto it
        for number, row in tsv_rows(path, handle, quoting=csv.QUOTE_NONE):
            if number == 1 and row[:1] == ["query-id"]:
                continue
            if not row:
                continue
            if len(row) != 3:
                raise BEIRDataError(f"{path}:{number}: expected 3 tab-separated columns, got {len(row)}")
            if number == 1 and row[2].strip().lower() == "score":  # said "score 'score' is not a number"
                raise BEIRDataError(f"{path}:1: a header BEIR does not write ({' / '.join(row)}): its qrels start "
                                    "with 'query-id<TAB>corpus-id<TAB>score', or with no header")
            _add_judgement(qrels, *row, f"{path}:{number}", corpus, queries, missing=missing_documents)
    if not qrels:  # found now, not after the corpus has been encoded
        raise BEIRDataError(f"{path}: no judgements (an empty file, or a header alone)")
    return qrels


def _add_judgement(qrels, query_id: str, doc_id: str, score, where: str, corpus=None, queries=None,
                   sources=("queries.jsonl", "corpus.jsonl"), missing=None) -> None:
    """qrels[query_id][doc_id] = score as an int grade, after the checks every qrels source gets; ``where`` (file
    and line, or hub row) starts each error, ``sources`` name where the queries and the corpus came from. A
    document not in ``corpus`` is an error, or appended to ``missing`` as (where, query id, doc id) if given."""
    try:
        relevance = relevance_grade(score)
    except ValueError as error:
        raise BEIRDataError(f"{where}: score {score!r} is {error}") from None
    if queries is not None and query_id not in queries:
        raise BEIRDataError(f"{where}: query id {query_id!r} is not in {sources[0]}")
    if corpus is not None and doc_id not in corpus:
        if missing is None:
            raise BEIRDataError(f"{where}: corpus id {doc_id!r} is not in {sources[1]} (evaluating a dataset whose qrels "
                                "judge documents its corpus lacks, as BEIR's ArguAna does? eval_fles1.py "
                                "--keep-missing-docs / load_beir(keep_missing_documents=True) keeps them judged, "
                                "BEIR's convention; training needs such judgements removed)")
        missing.append((where, query_id, doc_id))
    judged = qrels.setdefault(query_id, {})
    if judged.get(doc_id, relevance) != relevance:
        raise BEIRDataError(f"{where}: ({query_id!r}, {doc_id!r}) judged again with another score "
                            f"({judged[doc_id]} before, {relevance} here)")
    judged[doc_id] = relevance


def fingerprint_files(paths: list[str]) -> str:
    """Content hash of data files (sha256 over each file's name, then its bytes), for cache keys and reports.
    Files are not delimited by length: kept so, since recorded results and caches carry these fingerprints."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def load_beir(source: str, split: str = "test", keep_missing_documents: bool = False) -> BEIRDataset:
    """A BEIR folder, or a hub dataset id when ``source`` is not a folder (needs network).

    A judgement of a document the corpus lacks is an error naming its file and line, or, with
    ``keep_missing_documents``, kept (a relevant one counts as a document no run can retrieve, as BEIR and pytrec_eval
    count it), warned about and listed in ``missing_documents``."""
    if not source.strip():  # an unset $DATA: datasets raised an IndexError for the hub id ""
        raise BEIRDataError(f"{source!r}: empty; name a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) or a hub "
                            "dataset id")
    if not os.path.isdir(source):
        if os.path.exists(source) or source.startswith((".", "/")):
            raise BEIRDataError(f"{source}: not a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
        return load_beir_from_hub(source, split, keep_missing_documents)
    corpus_path = jsonl_path(os.path.join(source, "corpus.jsonl"))
    queries_path = jsonl_path(os.path.join(source, "queries.jsonl"))
    qrels_path = os.path.join(source, "qrels", f"{split}.tsv")
    if not os.path.isfile(qrels_path):  # before reading the corpus; name the splits there are
        folder = os.path.join(source, "qrels")
        splits = sorted(name[:-4] for name in os.listdir(folder) if name.endswith(".tsv")) \
            if os.path.isdir(folder) else []
        gzipped = f"; {qrels_path}.gz is gzipped: gunzip it" if os.path.isfile(f"{qrels_path}.gz") else ""
        raise BEIRSplitError(f"{qrels_path}: file not found (splits here: {', '.join(splits) or 'none'}){gzipped}")
    corpus = load_corpus(corpus_path)
    queries = load_queries(queries_path)
    missing = [] if keep_missing_documents else None
    qrels = load_qrels(qrels_path, corpus=corpus, queries=queries, missing_documents=missing)
    return BEIRDataset(
        name=os.path.basename(os.path.abspath(source)),  # `--data ..` names the folder above, not ".."
        corpus=corpus,
        queries=queries,
        qrels=qrels,
        split=split,
        fingerprint=fingerprint_files([corpus_path, queries_path, qrels_path]),
        missing_documents=_warn_missing(missing, "corpus.jsonl"),
    )


def _warn_missing(missing: list | None, corpus_name: str) -> list[tuple[str, str]]:
    """Warn once for judgements of documents the corpus lacks; their (query id, doc id) pairs."""
    missing = missing or []
    if missing:
        where, _, doc_id = missing[0]
        relevant = "" if len(missing) == 1 else f" ({len(missing)} judgements; the first)"
        warnings.warn(f"{where}: corpus id {doc_id!r} is not in {corpus_name}{relevant}: kept as judged, so a relevant "
                      "one counts as a document no run can retrieve (as BEIR and pytrec_eval count it)",
                      BEIRDataWarning, stacklevel=3)
    return [(query_id, doc_id) for _, query_id, doc_id in missing]


def _load_from_hub(dataset_id: str, *args, **kwargs):
    """`datasets.load_dataset`, with its failures (offline, unknown id or split) as a BEIRDataError naming the id."""
    from datasets import load_dataset

    try:
        return load_dataset(dataset_id, *args, **kwargs)
    except ValueError as error:
        if str(error).startswith("Unknown split"):  # it loaded: only the split is not there
            raise BEIRSplitError(f"{dataset_id}: no split {kwargs.get('split')!r} ({error})") from error
        raise _not_loaded(dataset_id, error) from error
    except OSError as error:  # ConnectionError, DatasetNotFoundError
        raise _not_loaded(dataset_id, error) from error


def _not_loaded(dataset_id: str, error: Exception) -> BEIRDataError:
    local = "" if os.path.exists(dataset_id) else "no local file or folder of that name, and "
    return BEIRDataError(f"{dataset_id}: {local}could not load it from the Hugging Face Hub "
                         f"({type(error).__name__}: {error}); a local BEIR folder works offline")


def load_beir_from_hub(dataset_id: str, split: str = "test", keep_missing_documents: bool = False) -> BEIRDataset:
    """The same checks as a local folder's, each error naming the hub dataset, config and row."""
    tables = {}
    for config, fields in (("corpus", ("title", "text")), ("queries", ("text",))):
        rows = tables[config] = {}
        for number, row in enumerate(_load_from_hub(dataset_id, config, split=config)):
            where = f"{dataset_id} {config} row {number}"
            texts = {name: _text_field(row.get(name), f"{where}: '{name}'") for name in fields}
            _add_row(rows, _row_id(row["_id"], where), texts, fields, where, number, "row")
    corpus = {row_id: row for row_id, (_, row) in tables["corpus"].items()}
    queries = {row_id: row["text"] for row_id, (_, row) in tables["queries"].items()}
    if not corpus:
        raise BEIRDataError(f"{dataset_id}: no documents in its corpus")
    qrels: dict[str, dict[str, int]] = {}
    missing = [] if keep_missing_documents else None
    for number, row in enumerate(_load_from_hub(f"{dataset_id}-qrels", split=split)):
        _add_judgement(qrels, str(row["query-id"]), str(row["corpus-id"]), row["score"],
                       f"{dataset_id}-qrels {split} row {number}", corpus, queries,
                       (f"{dataset_id} queries", f"{dataset_id} corpus"), missing)
    if not qrels:
        raise BEIRDataError(f"{dataset_id}-qrels {split}: no judgements")
    fingerprint = hashlib.sha256(f"{dataset_id}:{split}:{len(corpus)}:{len(qrels)}".encode()).hexdigest()[:16]
    return BEIRDataset(dataset_id.split("/")[-1], corpus, queries, qrels, split, fingerprint,
                       _warn_missing(missing, f"{dataset_id} corpus"), hub_id=dataset_id)
