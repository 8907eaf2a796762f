"""Command-line entry points of the engine (``python -m engine <command> ...``).

Each module listed in :data:`COMMAND_MODULES` exposes ``COMMANDS``: a dict mapping a
subcommand name to ``(help, add_arguments(parser), handler(args) -> exit code)``. To add a
command, write such a module and append its name here; argparse lives only in this package.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

AddArguments = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[argparse.Namespace], int]

COMMAND_MODULES: tuple[str, ...] = ("engine.cli.meta", "engine.cli.adapt")


def commands() -> dict[str, tuple[str, AddArguments, Handler]]:
    found: dict[str, tuple[str, AddArguments, Handler]] = {}
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        for name, entry in module.COMMANDS.items():
            if name in found:
                raise RuntimeError(f"subcommand {name!r} defined twice (again in {module_name})")
            found[name] = entry
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="nasweb engine commands")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, handler) in commands().items():
        # argparse %-formats help strings ("95% CI" would crash --help); descriptions are literal.
        command = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        add_arguments(command)
        command.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ValueError as error:  # engine errors are ValueError subclasses with a clear message
        print(f"error: {error}", file=sys.stderr)
        return 2
