"""Command-line options several commands share (light: imported while the parser is built)."""

from __future__ import annotations

import argparse


def add_set_option(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable), collected into ``args.overrides`` for the config loader."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)
