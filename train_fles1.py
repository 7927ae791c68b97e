#!/usr/bin/env python
"""Train a FLES-1 sparse encoder from a recipe (formulas: fles1/training/*.py docstrings).

    python train_fles1.py --recipe recipes/fles1-tiny-nfcorpus.yaml --output-dir outputs/tiny
    python train_fles1.py --recipe recipes/fles1-tiny-nfcorpus.yaml --output-dir outputs/tiny --resume  # last ckpt
    python train_fles1.py --recipe recipes/fles1-tiny-nfcorpus.yaml --output-dir outputs/tiny --overwrite  # anew
    python train_fles1.py --recipe ... --output-dir ... --max-steps 20 --set clfr.target_nnz_d=120 --eval-dev
    torchrun --nproc_per_node 2 train_fles1.py --recipe ... --output-dir ...                           # DDP

Writes OUTPUT_DIR/: the trained FLES-1 checkpoint folder, checkpoint-<step>/ folders (each also one, plus the
Trainer, CLFR, crash and log-window states), training_log.json and loss.png, nnz.png, lambda_d.png (the log's
history and the plots need at least training.logging_steps steps). An --output-dir holding an earlier run is refused
unless --resume (continue it) or --overwrite (replace it); --resume CHECKPOINT of another run into such a folder
needs --overwrite too (the folder's run is replaced by the continuation). --max-steps is not remembered: a resumed
run ends at this command's --max-steps, else at the recipe's training.max_steps or num_train_epochs (another end
than the checkpoint's run was scheduled for mixes two learning-rate schedules, with a warning). Resuming from a
checkpoint past that step, or at it once the run has written training_log.json, is refused and leaves the run as it
is, as is one whose weights do not fit --model / model.path, that saved with training.save_only_model (no
optimizer state to resume) or that lacks a whole optimizer, scheduler, RNG state or weights file (--resume alone
takes the newest whole checkpoint; a DDP run's RNG states resumed on another number of processes warn that they do
not come back); a run killed after its last checkpoint, while writing its final folder, plots or log, is
finished by --resume. A triples TSV has no relevance judgements: data.positive=bm25 and
data.mask_false_negatives=true need a BEIR source. Exit status: 0 trained; 2 bad input (one "error: ..." line; setup
problems are found before the first step).
"""

import argparse
import glob
import json
import warnings
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def main(argv=None):
    from fles1.cli import at_least, interrupts_exit

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe YAML (recipes/)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--model", help="override model.path (FLES-1 folder or BERT masked-LM)")
    parser.add_argument("--data", help="override data.source (BEIR folder/hub id or triples TSV)")
    parser.add_argument("--max-steps", type=at_least(1),
                        help="stop after this many optimizer steps (not remembered by --resume: give it again)")
    parser.add_argument("--target-nnz-d", type=float, help="override clfr.target_nnz_d")
    parser.add_argument("--clfr-interval-steps", type=int, help="override clfr.interval_steps")
    parser.add_argument("--resume", nargs="?", const=True, default=None,
                        help="resume from the last checkpoint in --output-dir, or from the given checkpoint folder "
                             "(one at or past the run's last step is refused: nothing to train)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --output-dir that holds an earlier run (its checkpoint-*, "
                             "training_log.json and plots are removed at the start, its final model once the new "
                             "run saves its own: an interrupted overwrite leaves the old model loadable -- but for a "
                             "kill -9 in the final save's few milliseconds of file moves, which leaves no config.json: "
                             "--resume finishes it)")
    parser.add_argument("--eval-dev", action="store_true", help="evaluate dev NDCG@10 at the end (BEIR data)")
    parser.add_argument("--trace-nnz", action="store_true", help="write each rank's per-batch doc non-zeros (of "
                        "the steps this process trains: a resumed run's trace starts after its checkpoint)")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any recipe value")
    args = parser.parse_args(argv)
    with interrupts_exit():  # Ctrl-C / SIGTERM: one line; the checkpoints written so far stay (--resume)
        _run(args)


def _run(args) -> None:
    from fles1.cli import exit_bad_input
    from fles1.training.recipe import load_recipe, parse_overrides

    try:
        overrides = parse_overrides(args.set)
    except ValueError as error:
        exit_bad_input(str(error))
    set_keys = list(overrides)  # before the flags join them
    for key, value in (("model.path", args.model), ("data.source", args.data),
                       ("clfr.target_nnz_d", args.target_nnz_d), ("clfr.interval_steps", args.clfr_interval_steps)):
        if value is not None:
            overrides[key] = value
    try:
        recipe = load_recipe(args.recipe, overrides)
    except FileNotFoundError:  # which ones there are, not only errno 2
        shipped = [path if os.path.relpath(path).startswith("..") else os.path.relpath(path)
                   for path in sorted(glob.glob(os.path.join(RECIPES, "*.yaml")))]
        exit_bad_input(f"--recipe {args.recipe}: no such file; the shipped recipes: "
                       f"{', '.join(shipped) or 'none found in ' + RECIPES}")
    except (ValueError, OSError) as error:  # OSError: e.g. a folder given
        exit_bad_input(str(error))
    ignored = [flag for flag, value in (("--target-nnz-d", args.target_nnz_d),
                                        ("--clfr-interval-steps", args.clfr_interval_steps)) if value is not None]
    ignored += [f"--set {key}" for key in set_keys if key.startswith("clfr.") and key != "clfr.enabled"]
    if ignored and not recipe["clfr"]["enabled"]:  # the run would look steered, at a fixed lambda_d
        warnings.warn(f"{' and '.join(ignored)} steer CLFR, which this recipe turns off (clfr.enabled: false): "
                      f"lambda_d stays {recipe['loss']['lambda_d']:g}")

    from fles1.training.run import TrainingSetupError, train

    try:
        log = train(recipe, args.output_dir, resume_from_checkpoint=args.resume, max_steps=args.max_steps,
                    eval_dev=args.eval_dev, trace_nnz=args.trace_nnz, overwrite=args.overwrite)
    except TrainingSetupError as error:
        exit_bad_input(str(error))
    if log is not None:
        print(json.dumps({"global_step": log["global_step"], "train_runtime_s": round(log["train_runtime_s"], 1),
                          "crashes": log["crashes"], "clfr": log["clfr"][-3:], "eval": log["eval"]}, indent=1))


if __name__ == "__main__":
    main()
