"""The ``shoal`` CLI: every subcommand is wired, unknown flags are errors except for ``sim``."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from shoal.cli import COMMANDS, build_parser, chosen_command, main


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


def test_the_chosen_command_is_the_first_word_naming_one() -> None:
    assert chosen_command(["--log-level", "DEBUG", "sim", "--model", "router"]) == "sim"
    assert chosen_command(["--help"]) == ""
    assert chosen_command([]) == ""


@pytest.mark.parametrize("command", ["sim", "router"])
def test_an_engine_or_router_start_does_not_import_the_operators_libraries(command: str) -> None:
    """Every engine pod runs ``shoal sim`` and every router replica ``shoal router``: only the
    chosen subcommand's module is imported, not kopf and the Kubernetes client."""
    code = (
        "import sys; from shoal.cli import build_parser; "
        f"build_parser(only={command!r}).parse_known_args([{command!r}]); "
        "print(sorted(m for m in ('kopf', 'kubernetes_asyncio') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    with_all = subprocess.run(
        [sys.executable, "-c", code.replace(f"only={command!r}", "only=None")],
        capture_output=True, text=True, check=True, cwd="/",
    )  # fmt: skip
    assert "kopf" in with_all.stdout  # the check can fail: the full parser does import it
