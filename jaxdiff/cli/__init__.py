"""``jaxdiff`` command line: ``jaxdiff generate|classify ...`` (one module per sub-command).

This package is the command-line layer: argument parsing, job manifests, result folders.
The library never imports it. Errors in user input end the command with one
``error: ...`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from jaxdiff.cli import classify, generate, serve

COMMANDS = {"generate": generate, "classify": classify, "serve": serve}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    args = parser.parse_args(argv)
    warnings.simplefilter("default")
    try:
        return COMMANDS[args.command].run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
