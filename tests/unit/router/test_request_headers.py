"""The gateway reads the headers it needs in one pass over the raw ASGI list."""

from __future__ import annotations

from shoal.router.proxy import read_headers


def test_picks_the_headers_the_gateway_reads_first_occurrence_winning() -> None:
    raw = [
        (b"host", b"router"),
        (b"content-length", b"42"),
        (b"x-shoal-priority", b"sheddable"),
        (b"x-shoal-priority", b"critical"),  # a repeat does not override the first
        (b"authorization", b"Bearer k\xe9y"),  # latin-1, as Starlette decodes
        (b"x-session-id", b"s1"),
        (b"user-agent", b"curl"),
    ]
    assert read_headers(raw) == {
        "content-length": "42",
        "x-shoal-priority": "sheddable",
        "authorization": "Bearer k\u00e9y",
        "x-session-id": "s1",
    }
    assert read_headers([]) == {}
