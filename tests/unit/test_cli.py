"""The ``shoal`` CLI: every subcommand is wired, unknown flags are errors except for ``sim``."""

from __future__ import annotations

import argparse

import pytest

from shoal.cli import COMMANDS, build_parser, main


def test_every_command_has_a_parser_and_a_runner() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {c.name for c in COMMANDS}
    for command in COMMANDS:
        assert callable(command.function("run_"))


def test_unknown_flags_fail_except_for_the_simulator() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--no-such-flag"])
    assert exc.value.code == 2
    # vLLM flags the simulator does not model parse (and are logged and ignored at run time).
    args, unknown = build_parser().parse_known_args(["sim", "--a-future-vllm-flag=4"])
    assert args.command == "sim" and unknown == ["--a-future-vllm-flag=4"]
