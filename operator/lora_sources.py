"""Getting a LoRA adapter's files to where the engines can read them.

How files reach the engine: the operator and the engine pods share one directory, the *adapter
cache* (``--lora-cache-dir``, default ``/var/lib/shoal/lora``), mounted at the same path in both
(a ReadWriteMany volume on a cluster; on the local test cluster both run on the host, so a plain
directory is shared). The operator downloads into it and tells the engine the path in
``/v1/load_lora_adapter``. Sources that are already files need no copy:

* ``file:///path``: that path, as is (it must exist where the operator runs, so that a typo is an
  error before any engine sees it);
* ``pvc://claim/path``: ``<pvc root>/<claim>/<path>``; the engines mount the claim there (the
  operator does not, so it cannot check the path; the engine's answer does);
* ``https://host/x.tar.gz|.tgz|.zip``: streamed with a size limit and extracted safely (no absolute
  paths, no ``..``, no links or device files, limits on files and unpacked bytes);
* ``s3://bucket/prefix``: every object under the prefix, with boto3 (``AWS_ENDPOINT_URL`` in the
  credentials points it at a non-AWS endpoint);
* ``hf://org/name[@revision]``: ``huggingface_hub.snapshot_download`` (``HF_TOKEN``).

A download lands in ``<cache>/<namespace>/<adapter>/<hash of source>`` through a temporary
directory renamed into place when complete, so a half-written adapter is never loaded and a later
reconcile reuses a finished one. Blocking client libraries run in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit

import httpx

DEFAULT_CACHE_DIR = Path("/var/lib/shoal/lora")
DEFAULT_PVC_ROOT = Path("/mnt/shoal/pvc")
# Adapters are tens to hundreds of MB (rank 64 on a 70B model is ~1.6 GB in fp16); the default
# limits leave room for that and stop a wrong URL from filling the volume.
DEFAULT_MAX_BYTES = 4 * 1024**3
DEFAULT_MAX_FILES = 1000


class SourceError(Exception):
    """The adapter's files cannot be had; ``reason`` is the condition reason."""

    def __init__(self, message: str, reason: str = "SourceUnavailable") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_files: int = DEFAULT_MAX_FILES
    timeout_s: float = 300.0


# --------------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class FileSource:
    path: Path


@dataclass(frozen=True)
class PvcSource:
    claim: str
    path: str


@dataclass(frozen=True)
class HttpsSource:
    url: str
    archive: str  # "tar" or "zip"


@dataclass(frozen=True)
class S3Source:
    bucket: str
    prefix: str


@dataclass(frozen=True)
class HfSource:
    repo_id: str
    revision: str | None


Source = FileSource | PvcSource | HttpsSource | S3Source | HfSource

_HF = re.compile(r"^hf://([A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(.+))?$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PVC_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _safe_relative(path: str, what: str) -> str:
    parts = PurePosixPath(path).parts
    if any(p == ".." for p in parts):
        raise SourceError(f"{what}: '..' is not allowed in the path", "InvalidSource")
    return "/".join(p for p in parts if p not in ("/", "."))


def parse_source(uri: str) -> Source:
    """The typed source of a ``spec.source``; SourceError(reason InvalidSource) when malformed."""
    if uri.startswith("hf://"):
        m = _HF.match(uri)
        if not m:
            raise SourceError(f"{uri!r}: expected hf://org/name[@revision]", "InvalidSource")
        return HfSource(m.group(1), m.group(2))
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc or not parts.path.startswith("/"):
            raise SourceError(f"{uri!r}: expected file:///absolute/path", "InvalidSource")
        return FileSource(Path(parts.path))
    if parts.scheme == "pvc":
        if not _PVC_CLAIM.match(parts.netloc):
            raise SourceError(f"{uri!r}: expected pvc://claim/path", "InvalidSource")
        return PvcSource(parts.netloc, _safe_relative(parts.path, uri))
    if parts.scheme == "s3":
        if not _S3_BUCKET.match(parts.netloc):
            raise SourceError(f"{uri!r}: expected s3://bucket/prefix", "InvalidSource")
        return S3Source(parts.netloc, parts.path.lstrip("/"))
    if parts.scheme == "https":
        name = parts.path.lower()
        if name.endswith((".tar.gz", ".tgz", ".tar")):
            return HttpsSource(uri, "tar")
        if name.endswith(".zip"):
            return HttpsSource(uri, "zip")
        raise SourceError(
            f"{uri!r}: an https source must be a .tar.gz, .tgz, .tar or .zip archive",
            "InvalidSource",
        )
    raise SourceError(
        f"{uri!r}: unsupported source; use hf://, s3://, https://, pvc:// or file://",
        "InvalidSource",
    )


# --------------------------------------------------------------------------------------------------
# Safe extraction


def _check_member_path(name: str, archive: str) -> str:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or any(part == ".." for part in p.parts):
        raise SourceError(f"{archive}: unsafe path {name!r} in the archive", "UnsafeArchive")
    return str(p)


def extract_tar(data: IO[bytes], dest: Path, limits: FetchLimits) -> int:
    """Extract regular files and directories only; return the number of files."""
    files, unpacked = 0, 0
    with tarfile.open(fileobj=data, mode="r:*") as tar:
        for member in tar:
            rel = _check_member_path(member.name, "tar")
            if member.isdir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            if not member.isreg():
                raise SourceError(
                    f"tar: {member.name!r} is a link or special file; only regular files are "
                    "extracted",
                    "UnsafeArchive",
                )
            files += 1
            unpacked += member.size
            _check_limits(files, unpacked, limits)
            src = tar.extractfile(member)
            if src is None:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return files


def extract_zip(data: IO[bytes], dest: Path, limits: FetchLimits) -> int:
    files, unpacked = 0, 0
    try:
        archive = zipfile.ZipFile(data)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"zip: not a zip archive: {exc}", "UnsafeArchive") from None
    with archive:
        for info in archive.infolist():
            rel = _check_member_path(info.filename, "zip")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise SourceError(f"zip: {info.filename!r} is a symlink", "UnsafeArchive")
            if info.is_dir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            files += 1
            unpacked += info.file_size
            _check_limits(files, unpacked, limits)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with archive.open(info) as src, open(target, "wb") as out:
                # file_size is what the archive claims; count what it really inflates to
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    _check_limits(files, unpacked - info.file_size + written, limits)
                    out.write(chunk)
    return files


def _check_limits(files: int, unpacked: int, limits: FetchLimits) -> None:
    if files > limits.max_files:
        raise SourceError(
            f"the archive holds more than {limits.max_files} files (limit --lora-max-files)",
            "SourceTooLarge",
        )
    if unpacked > limits.max_bytes:
        raise SourceError(
            f"the adapter unpacks to more than {limits.max_bytes} bytes (limit --lora-max-bytes)",
            "SourceTooLarge",
        )


# --------------------------------------------------------------------------------------------------
# Fetching


def _start(final: Path) -> Path | None:
    """A fresh temporary directory next to ``final``, or None when ``final`` is complete."""
    if final.is_dir():
        return None
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".partial-", dir=final.parent))


def _finish(tmp: Path, final: Path, uri: str) -> None:
    """Rename a complete download into place (atomic on one filesystem)."""
    if not any(tmp.iterdir()):
        raise SourceError(f"{uri}: the source holds no files")
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # else another fetch finished first: keep that one
            raise


@dataclass(frozen=True)
class AdapterFetcher:
    """Fetches adapters into the shared cache; one per operator."""

    cache_dir: Path = DEFAULT_CACHE_DIR
    pvc_root: Path = DEFAULT_PVC_ROOT
    limits: FetchLimits = FetchLimits()
    # Hosts whose https:// sources are fetched over plain HTTP: a TLS-less in-cluster mirror, or a
    # test server. Empty by default; named one by one, never a wildcard.
    plain_http_hosts: frozenset[str] = frozenset()

    def target(self, namespace: str, adapter: str, uri: str) -> Path:
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        return self.cache_dir / namespace / adapter / digest

    async def fetch(
        self,
        namespace: str,
        adapter: str,
        uri: str,
        credentials: Mapping[str, str] | None = None,
    ) -> Path:
        """The local path the engines load the adapter from; SourceError when unavailable."""
        source = parse_source(uri)
        creds = dict(credentials or {})
        if isinstance(source, FileSource):
            if not await asyncio.to_thread(source.path.exists):
                raise SourceError(f"{uri}: no such file or directory where the operator runs")
            return source.path
        if isinstance(source, PvcSource):
            return self.pvc_root / source.claim / source.path
        final = self.target(namespace, adapter, uri)
        tmp = await asyncio.to_thread(_start, final)
        if tmp is None:
            return final  # fetched before (renamed into place only when complete)
        try:
            if isinstance(source, HttpsSource):
                await self._https(source, tmp, creds)
            elif isinstance(source, S3Source):
                await asyncio.to_thread(self._s3, source, tmp, creds)
            else:
                await asyncio.to_thread(self._hf, source, tmp, creds)
            await asyncio.to_thread(_finish, tmp, final, uri)
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
        return final

    async def _https(self, source: HttpsSource, dest: Path, creds: Mapping[str, str]) -> None:
        url = source.url
        if urlsplit(url).hostname in self.plain_http_hosts:
            url = "http://" + url.removeprefix("https://")
        headers = {}
        if creds.get("AUTHORIZATION"):
            headers["Authorization"] = creds["AUTHORIZATION"]
        buf = tempfile.TemporaryFile()  # noqa: SIM115 (closed below; archives need seeking)
        try:
            try:
                async with (
                    httpx.AsyncClient(timeout=self.limits.timeout_s, follow_redirects=True) as http,
                    http.stream("GET", url, headers=headers) as resp,
                ):
                    if resp.status_code != 200:
                        raise SourceError(f"{source.url}: HTTP {resp.status_code}")
                    declared = int(resp.headers.get("content-length") or 0)
                    if declared > self.limits.max_bytes:
                        raise SourceError(
                            f"{source.url}: {declared} bytes is over the limit of "
                            f"{self.limits.max_bytes}",
                            "SourceTooLarge",
                        )
                    size = 0
                    async for chunk in resp.aiter_bytes(1 << 20):
                        size += len(chunk)
                        if size > self.limits.max_bytes:
                            raise SourceError(
                                f"{source.url}: more than {self.limits.max_bytes} bytes",
                                "SourceTooLarge",
                            )
                        buf.write(chunk)
            except httpx.HTTPError as exc:
                raise SourceError(f"{source.url}: {type(exc).__name__}: {exc}") from None
            buf.seek(0)
            extract = extract_tar if source.archive == "tar" else extract_zip
            try:
                await asyncio.to_thread(extract, buf, dest, self.limits)
            except tarfile.TarError as exc:
                raise SourceError(f"{source.url}: not a valid tar archive: {exc}") from None
        finally:
            buf.close()

    def _s3(self, source: S3Source, dest: Path, creds: Mapping[str, str]) -> None:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs: dict[str, Any] = {
            "config": Config(
                connect_timeout=10, read_timeout=self.limits.timeout_s, retries={"max_attempts": 3}
            )
        }
        for env, arg in (
            ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
            ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
            ("AWS_SESSION_TOKEN", "aws_session_token"),
            ("AWS_ENDPOINT_URL", "endpoint_url"),
            ("AWS_REGION", "region_name"),
        ):
            if creds.get(env):
                kwargs[arg] = creds[env]
        s3 = boto3.client("s3", **kwargs)
        prefix = source.prefix.rstrip("/")
        files, total = 0, 0
        try:
            pages = s3.get_paginator("list_objects_v2").paginate(
                Bucket=source.bucket, Prefix=f"{prefix}/" if prefix else ""
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = str(obj["Key"])
                    if key.endswith("/"):
                        continue
                    rel = _check_member_path(key[len(prefix) :].lstrip("/"), f"s3://{key}")
                    files += 1
                    total += int(obj.get("Size", 0))
                    _check_limits(files, total, self.limits)
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(source.bucket, key, str(target))
        except (BotoCoreError, ClientError) as exc:
            raise SourceError(f"s3://{source.bucket}/{source.prefix}: {exc}") from None
        if files == 0:
            raise SourceError(f"s3://{source.bucket}/{source.prefix}: no objects under the prefix")

    def _hf(self, source: HfSource, dest: Path, creds: Mapping[str, str]) -> None:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError

        try:
            snapshot_download(
                repo_id=source.repo_id,
                revision=source.revision,
                local_dir=str(dest),
                token=creds.get("HF_TOKEN") or None,
                endpoint=creds.get("HF_ENDPOINT") or None,
            )
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise SourceError(f"hf://{source.repo_id}: {type(exc).__name__}: {exc}") from None
        # snapshot_download keeps its own bookkeeping next to the files; engines ignore it
        _check_limits(
            sum(1 for p in dest.rglob("*") if p.is_file()),
            sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()),
            self.limits,
        )


__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_PVC_ROOT",
    "AdapterFetcher",
    "FetchLimits",
    "FileSource",
    "HfSource",
    "HttpsSource",
    "PvcSource",
    "S3Source",
    "Source",
    "SourceError",
    "extract_tar",
    "extract_zip",
    "parse_source",
]
