"""API keys from the config and from a key file that is re-read when it changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.router.api_keys import ApiKeyTable, read_api_keys_file
from shoal.router.config import ApiKeyConfig, ConfigError
from shoal.router.types import Priority


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_reads_the_same_shape_as_the_inline_config(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "keys.yaml",
        "sk-a: {tenant: team-a, priority: critical, weight: 2}\nsk-b: {tenant: batch}\n",
    )
    keys = read_api_keys_file(path)
    assert keys["sk-a"] == ApiKeyConfig(tenant="team-a", priority="critical", weight=2)
    assert keys["sk-b"].priority == "standard"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sk-a: [unclosed", "not valid YAML"),
        ("- sk-a\n- sk-b\n", "must map each key"),
        ("sk-a: {tenant: t, priority: urgent}\n", "priority"),
        ("sk-a: {priority: critical}\n", "tenant"),
        ("'': {tenant: t}\n", "non-empty strings"),
    ],
)
def test_bad_files_say_what_to_fix(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_api_keys_file(_write(tmp_path / "keys.yaml", text))


def test_a_missing_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        ApiKeyTable({}, str(tmp_path / "absent.yaml"))


def test_inline_keys_and_file_keys_together_inline_wins(tmp_path: Path) -> None:
    path = _write(tmp_path / "keys.yaml", "sk-a: {tenant: from-file}\nsk-b: {tenant: b}\n")
    table = ApiKeyTable({"sk-a": ApiKeyConfig(tenant="inline", priority="sheddable")}, path)
    grant = table.lookup("sk-a")
    assert grant is not None and (grant.tenant, grant.priority) == ("inline", Priority.SHEDDABLE)
    assert table.lookup("sk-b") is not None and len(table) == 2


def test_reload_rotates_keys_and_weights(tmp_path: Path) -> None:
    path = _write(tmp_path / "keys.yaml", "sk-old: {tenant: t, weight: 1}\n")
    table = ApiKeyTable({}, path)
    assert not table.reload()  # unchanged content: nothing to do
    _write(tmp_path / "keys.yaml", "sk-new: {tenant: t, weight: 3}\n")
    assert table.reload()
    assert table.lookup("sk-old") is None
    assert table.lookup("sk-new") is not None
    assert table.tenant_weight("t") == 3


def test_a_broken_reload_keeps_the_keys_in_force_and_counts(tmp_path: Path) -> None:
    path = _write(tmp_path / "keys.yaml", "sk-a: {tenant: t}\n")
    table = ApiKeyTable({}, path)
    _write(tmp_path / "keys.yaml", "sk-a: {tenant: t, priority: nope}\n")
    assert not table.reload()
    assert table.lookup("sk-a") is not None
    assert table.reload_errors == 1
    (tmp_path / "keys.yaml").unlink()  # a Secret volume mid-swap, or a deleted Secret
    assert not table.reload()
    assert table.lookup("sk-a") is not None and table.reload_errors == 2


def test_an_emptied_key_file_locks_the_router_it_does_not_open_it(tmp_path: Path) -> None:
    path = _write(tmp_path / "keys.yaml", "sk-a: {tenant: t}\n")
    table = ApiKeyTable({}, path)
    _write(tmp_path / "keys.yaml", "")
    assert table.reload()
    assert len(table) == 0
    assert not table.open
    assert table.lookup("sk-a") is None


def test_without_keys_or_file_the_router_is_open() -> None:
    assert ApiKeyTable({}).open
    assert not ApiKeyTable({"k": ApiKeyConfig(tenant="t")}).open
