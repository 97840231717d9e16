"""`kosmos-g`: the one command-line face of the project.

Each subcommand lives in its own module `kosmos_g.cli.<name>` exposing
`register(subparsers)`; the module sets `func` on its parser. Modules are imported
lazily enough that `kosmos-g local ...` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module) in help order. A module that is missing is skipped so the
# CLI keeps working while a subcommand is being developed.
SUBCOMMANDS = [
    ("local", "kosmos_g.cli.local"),
    ("models", "kosmos_g.cli.models"),
    ("data", "kosmos_g.cli.data"),
    ("train", "kosmos_g.cli.train"),
    ("serve", "kosmos_g.cli.serve"),
    ("generate", "kosmos_g.cli.generate"),
    ("evaluate", "kosmos_g.cli.evaluate"),
    ("import", "kosmos_g.cli.import_official"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kosmos-g", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
