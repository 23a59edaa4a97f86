"""Loader for the vLLM 0.32.0 golden recordings (``shared/golden/vllm-0.32.0``).

Each exchange is a request sent to a real vLLM server and its byte-exact response; the contract
tests replay them in order against ``shoal sim`` and compare what a client can depend on.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def golden_root() -> Path:
    env = os.environ.get("SHOAL_GOLDEN_DIR")
    if env:
        return Path(env)
    # tests/contract/golden.py -> <repo>/../shared/golden/vllm-0.32.0
    return Path(__file__).resolve().parents[3] / "shared" / "golden" / "vllm-0.32.0"


@dataclass(frozen=True)
class Exchange:
    variant: str  # "main" or "details"
    number: int
    name: str
    note: str
    method: str
    path: str
    request_headers: list[tuple[str, str]]
    request_body: bytes | None
    status: int
    response_headers: list[tuple[str, str]]
    body_raw: str
    body_json: Any
    sse: str | None
    prom: str | None
    during: dict[str, Any] | None

    @property
    def id(self) -> str:
        return f"{self.variant}/{self.number:03d}_{self.name}"

    def response_header(self, name: str) -> str | None:
        for key, value in self.response_headers:
            if key.lower() == name:
                return value
        return None

    def request_header(self, name: str) -> str | None:
        for key, value in self.request_headers:
            if key.lower() == name:
                return value
        return None

    @property
    def is_stream(self) -> bool:
        return self.sse is not None

    def request_json(self) -> Any:
        if self.request_body is None:
            return None
        try:
            return json.loads(self.request_body)
        except ValueError:
            return None


_FILE = re.compile(r"^(\d{3})_(.+)\.json$")


def load(variant: str) -> list[Exchange]:
    """The exchanges of ``main`` or ``details`` in recorded order."""
    root = golden_root() / variant
    out: list[Exchange] = []
    for path in sorted(root.iterdir()):
        m = _FILE.match(path.name)
        if m is None:
            continue
        doc = json.loads(path.read_text())
        req, resp = doc["request"], doc["response"]
        sse_file = resp.get("sse_file")
        prom_file = resp.get("prom_file")
        raw = req.get("body_raw")
        out.append(
            Exchange(
                variant=variant,
                number=int(m.group(1)),
                name=m.group(2),
                note=doc.get("note") or "",
                method=req["method"],
                path=req["path"],
                request_headers=[(k, v) for k, v in req["headers"]],
                request_body=None if raw is None else raw.encode(),
                status=resp["status"],
                response_headers=[(k, v) for k, v in resp["headers"]],
                body_raw=resp.get("body_raw") or "",
                body_json=resp.get("body_json"),
                sse=(root / sse_file).read_text() if sse_file else None,
                prom=(root / prom_file).read_text() if prom_file else None,
                during=doc.get("during"),
            )
        )
    return out


def server_argv(variant: str) -> list[str]:
    doc = json.loads((golden_root() / variant / "index.json").read_text())
    return list(doc["server_argv"])


def sse_events(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body; raises if the framing is not vLLM's."""
    assert body.endswith("\n\n"), "an SSE body ends with a blank line"
    events = body[:-2].split("\n\n")
    payloads = []
    for event in events:
        assert event.startswith("data: "), f"every event is one data line: {event[:80]!r}"
        assert "\n" not in event, f"one line per event: {event[:80]!r}"
        payloads.append(event[len("data: ") :])
    return payloads


def prom_families(text: str) -> dict[str, str]:
    """Metric family name -> type, from the ``# TYPE`` lines of a Prometheus exposition."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            out[name] = kind
    return out


def prom_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of the first sample ``name{...}`` whose labels include ``labels``."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        rest = line[len(name) :]
        if rest and rest[0] not in "{ ":
            continue
        if labels and not all(f'{k}="{v}"' in rest for k, v in labels.items()):
            continue
        return float(line.rsplit(" ", 1)[1])
    return None
