"""Convert a BERT masked-LM checkpoint into a FLES-1 checkpoint folder.

    python convert_fles1.py ../shared/models/splade-tiny outputs/fles1-tiny

Exit status: 0 written; 2 bad input (a source that is not a BERT masked-LM, an OUT that may not be written, a
setting out of range), with one "error: ..." line.
"""

import argparse
import sys

from fles1.atomic import require_writable
from fles1.checkpoint import convert, require_new_folder_for
from fles1.cli import at_least, bad_input, interrupts_exit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="BERT masked-LM folder or hub id")
    parser.add_argument("out", help="output checkpoint folder")
    parser.add_argument("--threshold", type=at_least(0, float), default=None,
                        help="inference threshold (default: a FLES-1 source's own, else 0.3)")
    # >= 3: [CLS], one token, [SEP]; the upper bound is the source model's max_position_embeddings
    parser.add_argument("--query-max-length", type=at_least(3), default=None,
                        help="default: a FLES-1 source's own, else 64")
    parser.add_argument("--document-max-length", type=at_least(3), default=None,
                        help="default: a FLES-1 source's own, else 256")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (once the new one is complete)")
    args = parser.parse_args(argv)
    with interrupts_exit():
        return _run(args)


def _run(args) -> int:
    try:  # before the model loads; an OSError below is then the source's
        require_new_folder_for(args.source, args.out, args.overwrite)
        require_writable(args.out, "OUT", folder=True)
    except (FileExistsError, NotADirectoryError, ValueError) as error:
        return bad_input(str(error))
    try:
        out = convert(
            args.source,
            args.out,
            inference_threshold=args.threshold,
            query_max_length=args.query_max_length,
            document_max_length=args.document_max_length,
            overwrite=args.overwrite,
        )
    except (FileExistsError, NotADirectoryError) as error:  # about OUT, and the message names it
        return bad_input(str(error))
    except (OSError, ValueError) as error:  # no such folder/repo, not a BERT masked-LM, a bad setting
        return bad_input(f"{args.source}: {error}")
    print(f"FLES-1 checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
