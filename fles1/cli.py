"""What the CLIs share: argument types, the bad-input exit, and how Ctrl-C and SIGTERM end them."""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading
from typing import NoReturn

# Every CLI reports bad input (a missing file, a refused setting, an output it may not write) as one "error: ..."
# line on stderr and exit status 2, argparse's for usage errors; 1 is left to failures nobody foresaw (tracebacks).
BAD_INPUT = 2


def bad_input(message: str) -> int:
    """Report bad input as every CLI does; returns the exit status for ``main`` to return. The Hugging Face token
    never appears (a server or proxy echoing the Authorization header into its error text)."""
    print(f"error: {without_token(message)}", file=sys.stderr)
    return BAD_INPUT


def without_token(text: str) -> str:
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "<token>") if token else text


def exit_bad_input(message: str) -> NoReturn:
    raise SystemExit(bad_input(message))


def at_least(minimum, kind=int):
    """argparse type: a finite ``kind`` number >= minimum, else a usage error naming the value. NaN and inf are
    refused: inf would reach the results JSON as ``Infinity``, which strict JSON readers (jq, JSON.parse) reject."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= minimum or not math.isfinite(value):
            what = "an int" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {what} >= {minimum}, got {text!r}")
        return value
    return parse


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread by `interrupts_exit` (exit status 143)."""


@contextlib.contextmanager
def interrupts_exit():
    """A CLI's work: Ctrl-C and SIGTERM (`timeout`, Slurm, Docker, `kill`) end it with one line on stderr and exit
    status 130 / 143, after the cleanups on the way out ran (staging folders, temporaries, a validation
    subprocess), instead of a screen of traceback -- or, for SIGTERM, the process dying mid-write. SIGTERM's
    previous handler comes back afterwards (a test calling ``main()`` keeps pytest's)."""
    main_thread = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise Terminated(128 + signum)
