r"""Publish a FLES-1 checkpoint folder to the Hugging Face Hub with its generated model card.

    python push_fles1.py --model outputs/tiny --repo-id mindoval/fles1-v14 \
        --results outputs/eval_nfcorpus.json --training-log outputs/tiny/training_log.json --dry-run outputs/hub

(outputs/tiny: train_fles1.py's docstring; outputs/eval_nfcorpus.json: eval_fles1.py's.)

The folder (checkpoint + code files + README.md card + results/ + plots/) is validated by loading it fresh and
offline three ways (AutoModel and SparseEncoder with trust_remote_code=True, FLES1Encoder.from_pretrained) and
encoding a probe text; any failed check refuses the upload. --dry-run writes the folder and uploads nothing.
The commit replaces the branch's weights at the repo's root (*.safetensors, *.safetensors.index.json), results/ and
plots/ from earlier pushes (users would otherwise get an earlier push's model.safetensors beside new shards); other
files (fp16/..., notes) stay. Absolute local paths in the published JSON/YAML files are cut to their last component
and secrets (token-named keys, hf_ tokens, URL credentials) redacted; of the model folder only the checkpoint's files
are published.
The token comes from HF_TOKEN or a prior `hf auth login`; it is never printed. Exit status: 0 uploaded (or
written, --dry-run); 2 bad input or a failed check (nothing uploaded); 1 the Hub refused the upload or was
unreachable (no commit made).
"""

import argparse
import sys

from fles1.cli import bad_input, interrupts_exit
from fles1.publish import CardInputs, PublishError, UploadError, publish


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="FLES-1 checkpoint folder (convert_fles1.py / train_fles1.py)")
    parser.add_argument("--repo-id", required=True, help="owner/name, e.g. mindoval/fles1-v14")
    parser.add_argument("--private", action="store_true",
                        help="create the repo private (an existing public repo is refused, not made private)")
    parser.add_argument("--revision", help="branch to commit to (created if missing; not with --create-pr)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request against the default branch instead of committing")
    parser.add_argument("--dry-run", metavar="OUT_DIR", help="write the folder exactly as it would be uploaded; no upload")
    parser.add_argument("--results", nargs="+", required=True, metavar="RESULTS_JSON",
                        help="eval_fles1.py --output file(s) for the card (its metric tables)")
    parser.add_argument("--training-log", nargs="*", default=[], help="training_log.json file(s) (default: MODEL's)")
    parser.add_argument("--recipe", help="recipe YAML, for a card without a training log (default: the training "
                        "log's recipe, --set overrides included; a file that differs from it is refused)")
    parser.add_argument("--plots", nargs="*", default=[], help="PNG files (default: MODEL/*.png)")
    parser.add_argument("--base-model", help="Hub id of the backbone for the card's base_model")
    parser.add_argument("--studies", help="Markdown study tables for the card (experiments/summarize.py)")
    parser.add_argument("--license", help="Hub license id for the card (default: from MODEL/LICENSE, the backbone's: "
                        "apache-2.0 for the Apache text, other for another text, unknown without one)")
    args = parser.parse_args(argv)
    with interrupts_exit():
        return _run(args)


def _run(args) -> int:
    try:
        card = CardInputs(results=args.results, training_logs=args.training_log, plots=args.plots,
                          recipe=args.recipe, base_model=args.base_model, studies=args.studies, license=args.license)
        publish(args.model, args.repo_id, card, private=args.private, revision=args.revision,
                create_pr=args.create_pr, dry_run=args.dry_run)
    except PublishError as error:
        if isinstance(error, UploadError):  # the Hub or network failed, not the inputs
            print(f"error: {error}", file=sys.stderr)
            return 1
        return bad_input(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
