#!/usr/bin/env python
"""Training steps/s: FLES1Trainer (sparse max-pool backward) vs sentence-transformers' SparseEncoderTrainer with
SpladeLoss(SparseMultipleNegativesRankingLoss) (materialises batch x length x vocab logits), same model, same data,
same process, one after the other. Reports steps per wall second and per CPU second of this process. On a machine
whose cores other jobs share, both swing (wall time several-fold; CPU time less, but threads spinning while they
wait for a busy core count too): compare ratios from the same run, and repeat it.

    python benchmarks/bench_train.py                                   # batch 32 x (1 + 7), max length 256
    python benchmarks/bench_train.py --batch-size 4 --steps 3 --warmup 1   # fits a small shared CPU box

The peer needs ~3 x 4 bytes x batch x 8 x length x 30,522 of activations (~24 GB at the default size): on a
small-memory CPU machine use a smaller --batch-size; the ratio is what the bar (>= 2x on CPU) is about.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from fles1.atomic import atomic_write_json, require_writable  # noqa: E402
from fles1.beir import BEIRDataError  # noqa: E402
from fles1.cli import at_least, interrupts_exit  # noqa: E402
from fles1.evaluation import device_label  # noqa: E402
from fles1_encoder import _resolve_device  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall clock and this process's CPU time at each optimizer step's end."""

    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append((time.perf_counter(), time.process_time()))


def steps_per_second(timer: StepTimer, warmup: int) -> dict:
    """Steps per wall second, and per CPU second (less sensitive to other jobs than wall time, not immune), and
    each timed step's wall seconds."""
    timed = timer.times[warmup - 1:]
    steps = len(timed) - 1
    return {"wall": steps / (timed[-1][0] - timed[0][0]), "cpu": steps / (timed[-1][1] - timed[0][1]),
            "step_seconds": [round(b[0] - a[0], 4) for a, b in zip(timed, timed[1:])]}


def train_profiled(trainer, args, name: str) -> None:
    """trainer.train(), under torch.profiler when --profile: prints the top operators by self CPU and device time."""
    if not args.profile:
        trainer.train()
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        trainer.train()
    table = profiler.key_averages()
    print(f"== {name}: top operators by self CPU time")
    print(table.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    if len(activities) > 1:
        print(f"== {name}: top operators by self device time")
        print(table.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))


def trainer_settings(args) -> dict:
    """The TrainingArguments both trainers share."""
    return dict(per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps, learning_rate=2e-5,
                save_strategy="no", report_to="none", logging_steps=1000, disable_tqdm=True, seed=0,
                bf16=args.bf16, use_cpu=args.device.type == "cpu", dataloader_num_workers=args.workers)


def bench_fles1(folder, dataset, args, out):
    from transformers import TrainingArguments

    from fles1.training.run import load_model_for_training
    from fles1.training.trainer import FLES1Trainer

    model, tokenizer = load_model_for_training(folder)
    timer = StepTimer()
    training_args = TrainingArguments(out, **trainer_settings(args))
    trainer = FLES1Trainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                           query_max_length=query_max_length(args), document_max_length=args.max_length,
                           callbacks=[timer])
    train_profiled(trainer, args, "FLES1Trainer")
    return steps_per_second(timer, args.warmup)


def query_max_length(args) -> int:
    """Queries' max length for both trainers: the FLES-1 default (64), or the documents' when that is shorter."""
    return min(64, args.max_length)


def bench_sentence_transformers(folder, dataset, args, out):
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder import SparseEncoderTrainer, SparseEncoderTrainingArguments
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss

    model = SparseEncoder(folder, trust_remote_code=True, device=str(args.device))
    model.max_seq_length = args.max_length
    # its trainer cuts every column at max_seq_length: queries are cut to FLES1Trainer's query length beforehand
    limit = query_max_length(args)
    tokenizer = model.tokenizer
    dataset = dataset.map(lambda row: {"query": tokenizer.convert_tokens_to_string(
        tokenizer.tokenize(row["query"])[: limit - 2])})
    loss = SpladeLoss(model, SparseMultipleNegativesRankingLoss(model, scale=1 / 0.05),
                      document_regularizer_weight=3e-5, query_regularizer_weight=None)
    timer = StepTimer()
    training_args = SparseEncoderTrainingArguments(out, **trainer_settings(args))
    trainer = SparseEncoderTrainer(model=model, args=training_args, train_dataset=dataset, loss=loss,
                                   callbacks=[timer])
    train_profiled(trainer, args, "SparseEncoderTrainer")
    return steps_per_second(timer, args.warmup)


def trainer_device(device: torch.device) -> None:
    """ValueError unless transformers' Trainer runs on `device` (it picks the device itself: use_cpu, else the
    current CUDA device): the JSON would name a device the run did not use."""
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: the trainers run on cpu, cuda or mps")
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        raise ValueError(f"--device {device}: the trainers run on cuda:{torch.cuda.current_device()}, the current "
                         "device; pick another GPU with CUDA_VISIBLE_DEVICES")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(os.path.dirname(ROOT), "shared", "models", "splade-tiny"))
    parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "nfcorpus"))
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    parser.add_argument("--max-length", type=at_least(3), default=256)
    parser.add_argument("--steps", type=at_least(1), default=3, help="timed steps per trainer")
    parser.add_argument("--warmup", type=at_least(1), default=1, help="untimed steps first (the first step builds "
                        "the optimizer state)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--only", choices=["fles1", "sentence-transformers"], help="run one side only")
    parser.add_argument("--output", help="write the results JSON here")
    parser.add_argument("--workers", type=at_least(0), default=None,
                        help="dataloader workers for both trainers (default: 8 on CUDA, where tokenizing on the "
                             "main process starves the GPU; 0 on CPU)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators per trainer")
    args = parser.parse_args(argv)
    try:
        for flag, value in (("--model", args.model), ("--data", args.data)):
            if not value.strip():  # an unset $MODEL / $DATA
                raise ValueError(f"{flag} is empty: name a folder or hub id, or leave it out for the default")
        if args.output is not None:  # "" refused too
            require_writable(args.output, "--output")  # before the run, not after it
        args.device = _resolve_device(args.device)  # a device that is not here was run on the CPU and labelled
        trainer_device(args.device)
        if args.workers is None:
            args.workers = 8 if args.device.type == "cuda" else 0
        # models and trainer outputs, removed after (interrupted too: Ctrl-C and SIGTERM end with one line)
        with interrupts_exit(), tempfile.TemporaryDirectory(prefix="bench-train-") as work:
            run(args, work)
    except (BEIRDataError, ValueError) as error:  # a data folder or device that will not do
        parser.exit(2, f"error: {error}\n")


def run(args, work: str) -> None:
    import torch

    from fles1.checkpoint import convert
    from fles1.training.data import load_training_examples

    dataset = load_training_examples(args.data, "train", num_negatives=7, seed=0)
    needed = args.batch_size * (args.warmup + args.steps)
    if needed > len(dataset):  # before the conversion, not an IndexError after it
        raise ValueError(f"--batch-size {args.batch_size} x (--warmup {args.warmup} + --steps {args.steps}) = "
                         f"{needed} examples, but {args.data} has {len(dataset)}")
    dataset = dataset.select(range(needed))
    try:
        folder = convert(args.model, os.path.join(work, "model"), document_max_length=args.max_length)
    except (OSError, ValueError) as error:  # no such model, not a BERT masked-LM, --max-length above its positions
        raise ValueError(f"{args.model}: {error}") from None
    results = {"model": args.model, "data": args.data, "device": device_label(args.device),
               "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size, "documents_per_query": 8,
               "max_length": args.max_length, "query_max_length": query_max_length(args), "steps": args.steps,
               "warmup": args.warmup, "bf16": args.bf16, "dataloader_workers": args.workers,
               "profile": args.profile}  # profiled steps carry the profiler's overhead
    if args.only != "sentence-transformers":
        results["fles1_steps_per_s"] = bench_fles1(folder, dataset, args, os.path.join(work, "fles1"))
    if args.only != "fles1":
        results["sentence_transformers_steps_per_s"] = bench_sentence_transformers(
            folder, dataset, args, os.path.join(work, "st"))
    if args.only is None:
        fles1, peer = results["fles1_steps_per_s"], results["sentence_transformers_steps_per_s"]
        results["speedup"] = fles1["wall"] / peer["wall"]
        results["speedup_cpu_time"] = fles1["cpu"] / peer["cpu"]
    print(json.dumps(results, indent=1))
    if args.output:
        atomic_write_json(args.output, results, indent=1)


if __name__ == "__main__":
    main()
