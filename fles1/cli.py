"""Argument types the CLIs share."""

from __future__ import annotations

import argparse


def at_least(minimum, kind=int):
    """argparse type: a ``kind`` number >= minimum (NaN refused), else a usage error naming the value."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= minimum:
            what = "an int" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what} >= {minimum}, got {text!r}")
        return value
    return parse
