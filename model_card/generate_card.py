r"""Write the FLES-1 model card (README.md) from result files only.

    python model_card/generate_card.py --results outputs/eval_nfcorpus.json \
        --training-log outputs/tiny/training_log.json --repo-id mindoval/fles1-v14 --output outputs/README_card.md

Several --results files: files of the same model merge (one per dataset); files of other models (e.g. other seeds)
fill the reproducibility table. The first file's model is the published one.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fles1.atomic import atomic_open, require_writable  # noqa: E402
from fles1.card import build_card  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", required=True, help="eval_fles1.py --output JSON file(s)")
    parser.add_argument("--training-log", nargs="*", default=[], help="training_log.json file(s)")
    parser.add_argument("--recipe", help="recipe YAML, for a card without a training log (default: the training "
                        "log's recipe, --set overrides included; a file that differs from it is refused)")
    parser.add_argument("--repo-id", default="mindoval/fles1-v14",
                        help="the Hub repo the card describes (default: mindoval/fles1-v14): titles, snippets and the "
                             "rerun command use it")
    parser.add_argument("--revision", help="the branch the model is pushed to (default: main): the card's snippets "
                        "and rerun command load it")
    parser.add_argument("--license", default="apache-2.0",
                        help="Hub license id of the backbone (default: apache-2.0, the shipped splade-tiny's; "
                             "push_fles1.py reads it from the model folder's LICENSE)")
    parser.add_argument("--base-model", help="Hub id of the backbone (default: from the recipe when it is a hub id)")
    parser.add_argument("--plots", nargs="*", default=[], help="PNG paths relative to the card, linked in it")
    parser.add_argument("--studies", help="Markdown study tables made from result files (experiments/summarize.py)")
    parser.add_argument("--output", default="-", help="README path ('-': stdout); an existing file is refused "
                        "unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    args = parser.parse_args(argv)
    try:
        if args.output != "-":
            require_writable(args.output, "--output")  # before reading anything
            for option, paths in (("--results", args.results), ("--training-log", args.training_log),
                                  ("--recipe", [args.recipe]), ("--studies", [args.studies])):
                if any(path and os.path.realpath(path) == os.path.realpath(args.output) for path in paths):
                    # with --overwrite the card replaced its own input (a results file became Markdown)
                    raise ValueError(f"--output {args.output} is a file {option} reads; give the card its own path")
            if os.path.lexists(args.output) and not args.overwrite:  # e.g. the project's own README.md
                raise ValueError(f"--output {args.output} exists; pass --overwrite to replace it")
        card = build_card(args.results, args.training_log, args.recipe, args.repo_id, args.base_model, args.plots,
                          studies=args.studies, revision=args.revision, license=args.license)
    except ValueError as error:  # CardInputError, or an --output that cannot be written
        parser.exit(2, f"error: {error}\n")
    if args.output == "-":
        sys.stdout.write(str(card))
    else:
        try:
            with atomic_open(args.output) as handle:
                handle.write(str(card))
        except OSError as error:  # at write time (a full disk): what require_writable could not foresee
            parser.exit(2, f"error: --output {args.output}: cannot be written ({error.strerror})\n")
        print(f"model card written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
