"""FLES1Encoder vs sentence-transformers' SparseEncoder on the same checkpoint folder, texts and process.

    HF_HUB_OFFLINE=1 python benchmarks/bench_encode.py                      # converts ../shared/models/splade-tiny
    HF_HUB_OFFLINE=1 python benchmarks/bench_encode.py --model DIR --num-docs 512 --output bench.json
    HF_HUB_OFFLINE=1 python benchmarks/bench_encode.py --threads 1     # e.g. on a CPU shared with other jobs

Prints docs/s of each (document max length 256), their ratio, single-query encode latency p50 of each, the max
abs weight difference (float32, before threshold), the bf16 projection path separately (its docs/s, max abs
difference and whether top-10 rankings over the same documents change), and the vocabulary-projection floor.
Runs on CUDA when present. Absolute numbers depend on the machine's load; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fles1.atomic import atomic_write_json, require_writable  # noqa: E402
from fles1.beir import BEIRDataError, load_beir  # noqa: E402
from fles1.checkpoint import DEFAULT_BACKBONE, convert  # noqa: E402
from fles1.cli import at_least, interrupts_exit  # noqa: E402
from fles1.evaluation import device_label  # noqa: E402
from fles1_encoder import CheckpointError, FLES1Encoder, _resolve_device  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "nfcorpus")


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued kernels (cuda:1's, not the current device's), so timings end with the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def docs_per_second(encode, texts, device, rounds: int) -> list[float]:
    rates = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        encode(texts)
        synchronize(device)
        rates.append(len(texts) / (time.perf_counter() - start))
    return rates


def latency_p50_ms(encode_one, queries, device) -> float:
    timings = []
    for query in queries:
        synchronize(device)
        start = time.perf_counter()
        encode_one(query)
        synchronize(device)
        timings.append(time.perf_counter() - start)
    return 1000 * statistics.median(timings)


def projection_floor(hidden_size: int, vocab_size: int, dtype: torch.dtype, device, length=256, seconds=1.0):
    """docs/s of the bare (length x hidden) @ (hidden x vocab) matmul plus max over tokens, tiled like FLES-1."""
    hidden = torch.randn(length, hidden_size, device=device, dtype=dtype)
    weight = torch.randn(vocab_size, hidden_size, device=device, dtype=dtype)
    tiles = weight.split(4096) if device.type == "cpu" else [weight]

    def once():
        return [torch.matmul(tile, hidden.t()).amax(1) for tile in tiles]

    once()
    synchronize(device)
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        once()
        count += 1
    synchronize(device)
    return count / (time.perf_counter() - start)


def top10(queries: torch.Tensor, docs: torch.Tensor) -> list[list[int]]:
    return (queries @ docs.T).topk(min(10, docs.shape[0]), dim=1).indices.tolist()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="FLES-1 checkpoint folder (default: convert the shipped backbone)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="BEIR folder with corpus.jsonl, queries.jsonl and qrels/test.tsv (loaded as a test split; "
                             "its first --num-docs documents and --num-queries queries are timed)")
    parser.add_argument("--num-docs", type=at_least(1), default=256, help="documents encoded by each encoder")
    parser.add_argument("--num-queries", type=at_least(1), default=200, help="single queries timed for the p50")
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    parser.add_argument("--rounds", type=at_least(1), default=2, help="timed passes over the documents and queries, alternating")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.model == "":  # an unset $MODEL: not the shipped backbone's numbers under another name
            raise ValueError("--model is empty: name a FLES-1 folder, or leave it out for the shipped backbone")
        if args.output is not None:  # "" refused too
            require_writable(args.output, "--output")  # before the run, not after it
        args.device = _resolve_device(args.device)
        # interrupted (Ctrl-C, SIGTERM): one line, and the scratch folder goes too
        with interrupts_exit(), tempfile.TemporaryDirectory(prefix="fles1-bench-") as scratch:
            return run(args, args.model or convert(DEFAULT_BACKBONE, os.path.join(scratch, "fles1-tiny")))
    except (CheckpointError, BEIRDataError, ValueError) as error:  # a model, data folder or device that will not do
        parser.exit(2, f"error: {error}\n")


def run(args, model_dir: str) -> dict:
    from sentence_transformers import SparseEncoder

    device = args.device
    data = load_beir(args.data, "test")  # first N documents ("title text") and queries, in file order
    docs = [data.document_text(doc_id) for doc_id in list(data.corpus)[: args.num_docs]]
    queries = list(data.queries.values())[: args.num_queries]

    fles1 = FLES1Encoder.from_pretrained(model_dir, device=device, threshold=0.0)
    fles1_bf16 = FLES1Encoder.from_pretrained(model_dir, device=device, threshold=0.0, projection_dtype=torch.bfloat16)
    st = SparseEncoder(model_dir, trust_remote_code=True, device=str(device))
    st.max_seq_length = fles1.max_lengths["document"]
    batch = args.batch_size

    def st_docs(texts):
        return st.encode_document(texts, batch_size=batch, convert_to_tensor=True, show_progress_bar=False)

    def fles1_docs(texts, encoder=fles1):
        return encoder.encode_batch(texts, batch_size=batch, output="torch", show_progress_bar=False)

    # Warm up every path (weights cached per dtype, allocator, oneDNN kernels).
    st_docs(docs[:batch]), fles1_docs(docs[:batch]), fles1_docs(docs[:batch], fles1_bf16)
    st.encode_query(queries[0]), fles1.encode(queries[0], kind="query"), fles1_bf16.encode(queries[0], kind="query")

    rates = {"sentence_transformers": [], "fles1": [], "fles1_bf16": []}
    for _ in range(args.rounds):  # alternate so that load changes hit every encoder alike
        rates["sentence_transformers"] += docs_per_second(st_docs, docs, device, 1)
        rates["fles1"] += docs_per_second(fles1_docs, docs, device, 1)
        rates["fles1_bf16"] += docs_per_second(lambda t: fles1_docs(t, fles1_bf16), docs, device, 1)
    best = {name: max(values) for name, values in rates.items()}

    encode_query = {
        "sentence_transformers": st.encode_query,
        "fles1": lambda q: fles1.encode(q, kind="query"),
        "fles1_bf16": lambda q: fles1_bf16.encode(q, kind="query"),
    }
    p50_rounds = {name: [] for name in encode_query}
    for _ in range(args.rounds):  # alternating too; each round's p50 is over all queries, the best round reported
        for name, encode in encode_query.items():
            p50_rounds[name].append(latency_p50_ms(encode, queries, device))
    p50 = {name: min(values) for name, values in p50_rounds.items()}

    # Agreement, before threshold: documents and queries, float32 path and bf16 path.
    reference_docs = st_docs(docs).to_dense().float().cpu()
    reference_queries = st.encode_query(queries, batch_size=batch, convert_to_tensor=True).to_dense().float().cpu()
    fles1_docs_dense = fles1_docs(docs).to_dense().cpu()
    fles1_queries = fles1.encode_batch(queries, kind="query", output="torch").to_dense().cpu()
    bf16_docs = fles1_docs(docs, fles1_bf16).to_dense().cpu()
    bf16_queries = fles1_bf16.encode_batch(queries, kind="query", output="torch").to_dense().cpu()
    diff = max((fles1_docs_dense - reference_docs).abs().max().item(), (fles1_queries - reference_queries).abs().max().item())
    diff_bf16 = max((bf16_docs - reference_docs).abs().max().item(), (bf16_queries - reference_queries).abs().max().item())
    ranking_fp32, ranking_bf16 = top10(fles1_queries, fles1_docs_dense), top10(bf16_queries, bf16_docs)
    unchanged = sum(a == b for a, b in zip(ranking_fp32, ranking_bf16))

    config = fles1.config
    floor = {
        "float32": projection_floor(config.hidden_size, config.vocab_size, torch.float32, device),
        "bfloat16": projection_floor(config.hidden_size, config.vocab_size, torch.bfloat16, device),
    }
    results = {
        "model": args.model or f"{DEFAULT_BACKBONE} (converted)",  # not the temporary folder it converts into
        "data": args.data,
        "device": device_label(device),  # the CPU's or GPU's model: absolute numbers differ ~2x between CPUs
        "torch_threads": torch.get_num_threads(),
        "num_docs": len(docs),
        "num_queries": len(queries),
        "rounds": args.rounds,
        "document_max_length": fles1.max_lengths["document"],
        "query_max_length": fles1.max_lengths["query"],
        "batch_size": batch,
        "docs_per_second": best,
        "docs_per_second_rounds": rates,
        "ratio_fles1_vs_st": best["fles1"] / best["sentence_transformers"],
        "ratio_fles1_bf16_vs_st": best["fles1_bf16"] / best["sentence_transformers"],
        "query_latency_ms_p50": p50,
        "query_latency_ms_p50_rounds": p50_rounds,
        "max_abs_diff_float32": diff,
        "max_abs_diff_bf16": diff_bf16,
        "bf16_top10_unchanged": f"{unchanged}/{len(queries)}",
        "projection_floor_docs_per_second_at_256_tokens": floor,
    }
    print(f"device {results['device']}, {len(docs)} {data.name} docs at <= "
          f"{fles1.max_lengths['document']} tokens, {len(queries)} queries, batch {batch}")
    print(f"SparseEncoder      {best['sentence_transformers']:8.1f} docs/s   query p50 {p50['sentence_transformers']:.3f} ms")
    print(f"FLES1Encoder fp32  {best['fles1']:8.1f} docs/s   query p50 {p50['fles1']:.3f} ms   "
          f"ratio {results['ratio_fles1_vs_st']:.2f}x   max abs diff {diff:.2e}")
    print(f"FLES1Encoder bf16  {best['fles1_bf16']:8.1f} docs/s   query p50 {p50['fles1_bf16']:.3f} ms   "
          f"ratio {results['ratio_fles1_bf16_vs_st']:.2f}x   max abs diff {diff_bf16:.2e}   "
          f"top-10 unchanged {unchanged}/{len(queries)} queries")
    print(f"projection floor (256 tokens): fp32 {floor['float32']:.1f} docs/s, bf16 {floor['bfloat16']:.1f} docs/s")
    print("rounds, docs/s:", {name: [round(v, 1) for v in values] for name, values in rates.items()})
    print("rounds, query p50 ms:", {name: [round(v, 3) for v in values] for name, values in p50_rounds.items()})
    if args.output:
        atomic_write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
