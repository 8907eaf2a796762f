"""`python -m engine --help` and each subcommand's --help work (argparse formats help text)."""

from __future__ import annotations

import pytest

from engine.cli import build_parser, commands


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in commands()])
def test_help_of_every_command_prints_and_exits_cleanly(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 0
    assert "usage: python -m engine" in capsys.readouterr().out
