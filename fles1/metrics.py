"""IR metrics with pytrec_eval (trec_eval's C code), averaged BEIR-style over every judged query.

    >>> from fles1.metrics import evaluate_run   # qrels, run: {qid: {doc_id: grade}}, {qid: {doc_id: score}}
    >>> evaluate_run(qrels, run)  # {"ndcg@10", "mrr@10", "recall@100", "map@100", "recall@1000"}: their values

A judged query missing from the run, or with no hits, scores 0 (pytrec_eval would silently leave it out).
MRR@10 is trec_eval's ``recip_rank`` over each ranking cut to its top 10.
"""

from __future__ import annotations

import math

import pytrec_eval

from fles1.atomic import atomic_open

# our key -> trec_eval measure (pytrec_eval result key)
TREC_MEASURES = {
    "ndcg@10": "ndcg_cut_10",
    "recall@100": "recall_100",
    "map@100": "map_cut_100",
    "recall@1000": "recall_1000",
}
METRIC_KEYS = ("ndcg@10", "mrr@10", "recall@100", "map@100", "recall@1000")


def trec_order(ranking: dict[str, float]) -> list[tuple[str, float]]:
    """trec_eval's ranking order: score descending, ties by doc id descending."""
    return sorted(ranking.items(), key=lambda item: (item[1], item[0]), reverse=True)


def per_query_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, dict]:
    """{qid: {metric: value}} for every query in qrels (0 where the run has nothing for it). Ids are compared as
    str (an int query id 1 is "1", as in the run file); grades must be integers, scores finite numbers."""
    _check_encodable(qrels, "qrels")
    _check_encodable(run, "run")
    qrels = {str(qid): {str(did): _grade(rel, qid, did) for did, rel in docs.items()} for qid, docs in qrels.items()}
    run_ids = {str(qid) for qid in run}
    if run_ids and qrels and run_ids.isdisjoint(qrels):  # every query would score 0: ids that do not match
        raise ValueError(f"none of the run's {len(run_ids)} query ids is in qrels (e.g. {next(iter(run_ids))!r}; "
                         f"qrels has e.g. {next(iter(qrels))!r})")
    run = {str(qid): {str(did): _score(s, qid, did) for did, s in docs.items()} for qid, docs in run.items()
           if str(qid) in qrels and docs}
    scores = {qid: dict.fromkeys(METRIC_KEYS, 0.0) for qid in qrels}
    if run:
        evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100,1000", "map_cut.100"})
        for qid, values in evaluator.evaluate(run).items():
            scores[qid].update({key: values[measure] for key, measure in TREC_MEASURES.items()})
        top10 = {qid: dict(trec_order(docs)[:10]) for qid, docs in run.items()}
        for qid, values in pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10).items():
            scores[qid]["mrr@10"] = values["recip_rank"]
    return scores


RELEVANCE_LIMIT = 2**31  # pytrec_eval holds grades in a C int (and failed late, after the corpus was encoded)


def relevance_grade(value) -> int:
    """`value` (1, "1", 1.0) as an int relevance grade; ValueError naming why not -- its text reads after "is":
    not a number, not an integer (0.5 became 0: a relevant document judged non-relevant), or out of C int range."""
    try:
        grade = float(value)
    except (TypeError, ValueError):
        raise ValueError("not a number") from None
    if not grade.is_integer():
        raise ValueError("not an integer relevance grade")
    if not -RELEVANCE_LIMIT <= grade < RELEVANCE_LIMIT:
        raise ValueError(f"out of range for a relevance grade ([-{RELEVANCE_LIMIT}, {RELEVANCE_LIMIT - 1}])")
    return int(grade)


def _grade(rel, qid, did) -> int:
    try:
        return relevance_grade(rel)
    except ValueError as error:
        raise ValueError(f"qrels[{qid!r}][{did!r}] is {rel!r}: relevance grades are integers ({rel!r} is {error})") \
            from None


def _score(score, qid, did) -> float:
    """A run score as float; a NaN made the ranking depend on dict order."""
    try:
        value = float(score)
    except (TypeError, ValueError):  # None, "high"
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"run[{qid!r}][{did!r}] is {score!r}: scores must be finite numbers")
    return value


def _check_encodable(ids: dict[str, dict], what: str) -> None:
    """pytrec_eval hands ids to C as UTF-8: one it cannot encode (a lone surrogate, from a broken JSON \\u escape)
    ended the process with a segmentation fault instead of an error."""
    for qid, docs in ids.items():
        for name in (qid, *docs):
            try:
                str(name).encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(f"{what}: id {name!r} is not valid text ({error.reason}: "
                                 f"{error.object[error.start:error.end]!r} at character {error.start})") from None


def evaluate_run(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over all judged queries."""
    if not qrels:
        raise ValueError("qrels are empty: nothing to evaluate")
    scores = per_query_metrics(qrels, run)
    return {key: sum(values[key] for values in scores.values()) / len(scores) for key in METRIC_KEYS}


def format_score(score: float) -> str:
    # significant digits (float32's 9), not decimals: 6 decimals tied every score under ~1e-6 (weights of a model
    # scaled down, or a threshold of 0), and trec_eval's tie order by doc id then changed the metrics
    return f"{score:.9g}"


def rounded_run(run: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The run as its TREC file stores it (9 significant digits), so metrics from the dict and the file agree
    exactly."""
    return {qid: {did: float(format_score(s)) for did, s in docs.items()} for qid, docs in run.items()}


def check_trec_ids(ids, what: str, remedy: str = "leave out the run file") -> None:
    """A TREC run line is split on whitespace: an id holding any (or an empty id) would shift its fields."""
    for value in ids:
        if not value or any(character.isspace() for character in value):
            raise ValueError(f"{what} id {value!r} cannot go into a TREC run file (its fields are separated by "
                             f"whitespace): rename it, or {remedy}")


def write_trec_run(run: dict[str, dict[str, float]], path: str, tag: str = "fles1") -> None:
    """TREC run file ``qid Q0 docid rank score tag``, atomically."""
    check_trec_ids(run, "query")
    check_trec_ids({did for docs in run.values() for did in docs}, "corpus")
    with atomic_open(path) as handle:
        for qid, docs in run.items():
            for rank, (did, score) in enumerate(trec_order(docs), start=1):
                handle.write(f"{qid} Q0 {did} {rank} {format_score(score)} {tag}\n")


def read_trec_run(path: str) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if len(fields) != 6:
                raise ValueError(f"{path}:{number}: expected 'qid Q0 docid rank score tag'")
            try:
                score = float(fields[4])
            except ValueError:
                raise ValueError(f"{path}:{number}: score {fields[4]!r} is not a number") from None
            run.setdefault(fields[0], {})[fields[2]] = score
    return run

