"""Evaluate a FLES-1 checkpoint on BEIR datasets: NDCG@10, MRR@10, Recall@100, MAP@100, Recall@1000, NNZ,
a BM25 baseline (bm25s), production numbers (docs/s, query latency, index size) and engine exports.

    # a trained model (train_fles1.py's docstring writes outputs/tiny)
    HF_HUB_OFFLINE=1 python eval_fles1.py --model outputs/tiny --data ../shared/data/nfcorpus \\
        --threshold 0.3 --output outputs/eval_nfcorpus.json --run-file outputs/run.trec --markdown outputs/results.md

    # the shipped backbone as convert_fles1.py's docstring writes it, threshold 0: NDCG@10 0.3058 on nfcorpus
    # test (graded qrels; sentence-transformers' evaluator, binary relevance and its own tie order: 0.3059)
    python eval_fles1.py --model outputs/fles1-tiny --data ../shared/data/nfcorpus --threshold 0 \\
        --output outputs/t0.json

    # zero-shot table over several datasets (BEIR folders, or BEIR hub ids such as BeIR/scifact when online)
    python eval_fles1.py --model mindoval/fles1-v14 --data ../shared/data/nfcorpus BeIR/scifact --output outputs/zs.json

MODEL is a FLES-1 checkpoint folder or hub id. DATA is a BEIR folder (corpus.jsonl, queries.jsonl,
qrels/<split>.tsv) or a BEIR hub dataset id. BEIR conventions: every judged query counts (no hits = 0), a hit
whose id equals the query id is dropped (not where the qrels judge such a pair relevant: ids like "1", "2" that only
share their spelling; warned, counted as own_id_judgements), documents are "title text". A judged document missing
from the corpus is an error, or with --keep-missing-docs stays judged (a relevant one no run can retrieve, as BEIR counts it; warned, and
counted as judged_documents_missing in the output). Metrics come from pytrec_eval.

Document vectors are cached at threshold 0 under --cache-dir (default ~/.cache/fles1/corpus), keyed by the model
fingerprint (sha256 of model.safetensors + config.json), the corpus, the document max length, the projection dtype
and the encoding code in use (modeling, encoder and evaluation files, tokenizer, torch and transformers versions,
device type), so a rerun (any threshold) does not re-encode and a code change does. A corpus larger than 8,192
documents is encoded a shard of 8,192 at a time, each finished shard saved under the cache entry's name + .parts/,
so an interrupted run resumes from its last finished shard. With several datasets, --run-file run.trec writes
run.<dataset>.trec per dataset. --export DIR writes, per dataset, DIR/<dataset>/elasticsearch/ (mapping.json,
bulk-00001.ndjson ... of at most 16 MiB each for POST /_bulk -- rank_features, 9 significant bits per stored weight
-- and queries.jsonl, one _search body per query) and DIR/<dataset>/pyserini/ (collection/docs.jsonl:
JsonVectorCollection, integer impacts = round(100 w); queries.tsv: Anserini impact topics, each token repeated by
its impact), each with an export.json naming the model (path and fingerprint), threshold, split and the commands
to index and search, run from DIR/<dataset> (Elasticsearch: sh with curl 7.76+ and jq against $ES, each command exiting
non-zero at the first refusal, bulk responses kept in elasticsearch-bulk-responses.ndjson, search responses (ids and
scores) written to elasticsearch-responses.tsv, a query id and its response per line; Anserini: pyserini's indexer
and its SearchCollection); an earlier export's two folders are replaced together. Every output is written atomically;
bad data (qrels scores must be integer grades) stops the run with its file and line and writes nothing, as do ids
the requested outputs cannot carry (whitespace in a TREC run file or an export, an Elasticsearch _id over 512
bytes).
Exit status: 0 ok, 2 bad input (data or checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    from fles1.cli import at_least
    from fles1.evaluation import DEFAULT_CACHE_DIR, LATENCY_QUERIES

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="FLES-1 checkpoint folder or hub id")
    parser.add_argument("--data", required=True, nargs="+", help="BEIR folder(s) or BEIR hub dataset id(s)")
    parser.add_argument("--split", default="test", help="qrels split (default: test)")
    parser.add_argument("--threshold", type=at_least(0, float), default=None,
                        help="drop weights below it (default: the model's config.inference_threshold, 0.3 as "
                             "shipped; 0: none)")
    parser.add_argument("--output", help="results JSON (shared format)")
    parser.add_argument("--run-file", help="TREC run file (run.<dataset>.trec per dataset when several)")
    parser.add_argument("--markdown", help="Markdown tables for the model card (also printed)")
    parser.add_argument("--index-dir", help="keep the saved inverted indices here (<dataset>.index.npz)")
    parser.add_argument("--export", metavar="DIR", help="Elasticsearch/OpenSearch and Pyserini exports")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help=f"corpus encoding cache ({DEFAULT_CACHE_DIR})")
    parser.add_argument("--no-cache", action="store_true", help="encode the corpus without reading/writing a cache")
    parser.add_argument("--no-bm25", action="store_true", help="skip the BM25 baseline")
    parser.add_argument("--no-production", action="store_true",
                        help="skip the production metrics (docs/s, query latency, index size)")
    parser.add_argument("--keep-missing-docs", action="store_true",
                        help="keep qrels judgements of documents the corpus lacks (an error otherwise) as relevant "
                             "documents no run can retrieve, BEIR's convention (BeIR/arguana needs it)")
    parser.add_argument("--latency-queries", type=at_least(1), default=LATENCY_QUERIES,
                        help="queries timed one by one")
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from fles1.cli import interrupts_exit

    args = parse_args(argv)
    with interrupts_exit():
        return _run(args)


def _run(args) -> int:
    from fles1.atomic import require_writable
    from fles1.cli import bad_input
    from fles1.beir import BEIRDataError
    from fles1.evaluation import evaluate, markdown_tables, write_markdown, write_results
    from fles1_encoder import CheckpointError

    files = [(option, path) for option, path in
             (("--output", args.output), ("--markdown", args.markdown), ("--run-file", args.run_file)) if path]
    for index, (option, path) in enumerate(files):  # one written over the other: a run's results silently lost
        for other, earlier in files[:index]:
            if os.path.realpath(path) == os.path.realpath(earlier):
                return bad_input(f"{option} {path} is the file {other} writes too; give each output its own path")
    try:
        # here, named as flags (evaluate() checks them too, named as its arguments)
        for option, path, folder in (("--output", args.output, False), ("--markdown", args.markdown, False),
                                     ("--cache-dir", None if args.no_cache else args.cache_dir, True),
                                     ("--run-file", args.run_file, False), ("--index-dir", args.index_dir, True),
                                     ("--export", args.export, True)):
            if path is not None:  # "" too (an unset $OUT): refused, not taken for "not given"
                require_writable(path, option, folder=folder)
        results = evaluate(
            args.model, args.data, split=args.split, threshold=args.threshold,
            cache_dir=None if args.no_cache else args.cache_dir, bm25=not args.no_bm25,
            production=not args.no_production, run_file=args.run_file, index_dir=args.index_dir,
            export_dir=args.export, batch_size=args.batch_size, device=args.device,
            latency_queries=args.latency_queries, keep_missing_documents=args.keep_missing_docs,
            log=lambda message: print(message, file=sys.stderr),
            written_after={option: path for option, path in (("--output", args.output), ("--markdown", args.markdown))
                           if path},
        )
    except (BEIRDataError, CheckpointError, ValueError) as error:  # ValueError: e.g. a device not usable here
        return bad_input(str(error))
    print(markdown_tables(results))  # first: a write that fails below (a full disk) loses no result from sight
    for option, path, write in (("--output", args.output, write_results), ("--markdown", args.markdown, write_markdown)):
        if path:
            try:
                write(results, path)
            except OSError as error:
                return bad_input(f"{option} {path}: cannot be written ({error.strerror})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
