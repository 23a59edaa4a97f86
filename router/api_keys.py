"""API keys: which tenant and priority a key stands for, from the config or a file kept fresh.

Keys can be written inline in the router config (``api_keys``), which suits a laptop; on a
cluster they belong in a Secret, not in the ConfigMap that holds the rest of the config. So the
router also reads them from ``api_keys_file`` (the Helm chart mounts a Secret there), a YAML
mapping of the same shape::

    sk-team-a: {tenant: team-a, priority: critical, weight: 2}
    sk-batch: {tenant: batch, priority: sheddable}

The file is re-read every ``api_keys_reload_s`` when its content changed (Kubernetes swaps a
mounted Secret's files atomically a minute or so after an update), so keys are rotated without a
restart. A file that stops parsing keeps the keys already loaded, and says so in a log line and in
``shoal_router_api_keys_reload_errors_total``. With a file configured the router is never open,
even while the file holds no keys: an emptied Secret must lock the door, not open it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from shoal.router.config import (
    ApiKeyConfig,
    ConfigError,
    parse_yaml_mapping,
    priority_from_name,
    read_config_bytes,
)
from shoal.router.types import Priority

log = logging.getLogger(__name__)

# A key file bigger than this is a mistake (a wrong mount), not a key list.
MAX_KEY_FILE_BYTES = 16 * 1024 * 1024
_WHAT = "API keys file"


@dataclass(frozen=True, slots=True)
class KeyGrant:
    tenant: str
    priority: Priority


def read_api_keys_file(path: str | Path) -> dict[str, ApiKeyConfig]:
    """The keys in ``path``; ConfigError saying what is wrong otherwise."""
    return parse_api_keys(read_config_bytes(path, _WHAT, MAX_KEY_FILE_BYTES), path)


def parse_api_keys(raw: bytes, path: str | Path) -> dict[str, ApiKeyConfig]:
    """The keys in ``raw``, the content of the key file ``path``."""
    data = parse_yaml_mapping(raw, path, _WHAT, shape="must map each key to {tenant: ...}")
    keys: dict[str, ApiKeyConfig] = {}
    for key, entry in data.items():
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"API keys file {path}: keys must be non-empty strings, got {key!r}")
        try:
            keys[key] = ApiKeyConfig.model_validate(entry)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "entry"
            raise ConfigError(
                f"API keys file {path}: key {key[:4]}…: {where}: {first['msg']}"
            ) from None
    return keys


class ApiKeyTable:
    """The keys in force: the config's inline ones plus the file's, swapped whole on reload."""

    def __init__(self, inline: Mapping[str, ApiKeyConfig], file: str | None = None) -> None:
        self._inline = dict(inline)
        self.file = file
        self.reload_errors = 0
        self._file_digest: bytes | None = None
        self._grants: dict[str, KeyGrant] = {}
        self._weights: dict[str, float] = {}
        self._install({})
        if file is not None:
            self._load_file_if_changed(file)  # at start, a bad file is the caller's ConfigError

    @property
    def open(self) -> bool:
        """No key needed: nothing configured inline and no key file."""
        return self.file is None and not self._grants

    def __len__(self) -> int:
        return len(self._grants)

    def lookup(self, key: str) -> KeyGrant | None:
        return self._grants.get(key)

    def tenant_weight(self, tenant: str) -> float:
        return self._weights.get(tenant, 1.0)

    def reload(self) -> bool:
        """Re-read the file if its content changed; True if new keys were installed."""
        if self.file is None:
            return False
        try:
            changed = self._load_file_if_changed(self.file)
        except ConfigError as exc:
            self.reload_errors += 1
            log.error("API keys not reloaded, keeping the %d in force: %s", len(self), exc)
            return False
        if changed:
            log.info("API keys reloaded from %s: %d keys", self.file, len(self))
        return changed

    def _load_file_if_changed(self, file: str) -> bool:
        """Install the file's keys unless its content is the one already installed."""
        # Read once: the digest and the keys come from the same bytes.
        raw = read_config_bytes(file, _WHAT, MAX_KEY_FILE_BYTES)
        digest = hashlib.sha256(raw).digest()
        if digest == self._file_digest:
            return False
        keys = parse_api_keys(raw, file)  # a bad file leaves the digest, so it is retried
        self._file_digest = digest
        self._install(keys)
        return True

    async def watch(self, interval_s: float) -> None:
        """Reload forever (a background task of the router)."""
        while True:
            await asyncio.sleep(interval_s)
            self.reload()

    def _install(self, file_keys: Mapping[str, ApiKeyConfig]) -> None:
        both = {**file_keys, **self._inline}  # the config file names them explicitly: it wins
        self._grants = {
            key: KeyGrant(k.tenant, priority_from_name(k.priority)) for key, k in both.items()
        }
        self._weights = {k.tenant: k.weight for k in both.values()}
