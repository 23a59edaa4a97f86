"""Shared helpers for the benchmarks: machine facts and one section per bench in docs/benchmarks.md.

Each benchmark owns the text between ``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->``
and replaces only that, so benches can be re-run one at a time without clobbering each other.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"

_HEADER = """# Benchmarks

Written by the scripts in `bench/`; each script replaces only its own section (between its
`bench:NAME` markers). Numbers are from the machine named in each section: re-run the command shown
there to reproduce them.
"""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts() -> str:
    """One Markdown line: date, CPU, cores, Python, OS."""
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{now}; CPU {cpu_model()}, {cores} cores ({usable} usable); "
        f"Python {platform.python_version()} ({platform.python_implementation()}); "
        f"{platform.system()} {platform.release()}"
    )


def command_line() -> str:
    """The command that ran this benchmark, relative to the repository root."""
    argv = list(sys.argv)
    with contextlib.suppress(ValueError):
        argv[0] = str(Path(argv[0]).resolve().relative_to(REPO))
    return "python " + " ".join(shlex.quote(a) for a in argv)


def update_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section ``name`` of ``path`` with ``body``."""
    begin = f"<!-- bench:{name}:begin -->"
    end = f"<!-- bench:{name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else _HEADER
    i = text.find(begin)
    j = text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + block + text[j + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
