"""LoRA adapter sources against real servers: a local HTTP server for https:// archives and moto's
S3 server for s3://. hf:// needs the Hugging Face Hub, which is not reachable here: only its URL
parsing is tested (in this file, without network)."""

from __future__ import annotations

import asyncio
import http.server
import io
import os
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.local import HOST, free_port
from shoal.operator.lora_sources import (
    AdapterFetcher,
    FetchLimits,
    FileSource,
    HfSource,
    HttpsSource,
    PvcSource,
    S3Source,
    SourceError,
    parse_source,
)

ADAPTER_FILES = {
    "adapter_config.json": b'{"r": 8, "lora_alpha": 16}',
    "adapter_model.safetensors": b"\0" * 4096,
}


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    port = free_port()
    handler = lambda *a, **kw: _Handler(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer((HOST, port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"https://{HOST}:{port}"
    server.shutdown()
    server.server_close()


def _tar_gz(files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or ():
            tar.addfile(info)
    return buf.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def _fetcher(tmp_path: Path, max_bytes: int = 10**8, max_files: int = 100) -> AdapterFetcher:
    return AdapterFetcher(
        cache_dir=tmp_path / "cache",
        limits=FetchLimits(max_bytes=max_bytes, max_files=max_files),
        plain_http_hosts=frozenset({HOST}),
    )


# --------------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("hf://org/name", HfSource("org/name", None)),
        ("hf://org/name@v1.2", HfSource("org/name", "v1.2")),
        ("s3://my-bucket/adapters/a1", S3Source("my-bucket", "adapters/a1")),
        ("pvc://loras/team/a1", PvcSource("loras", "team/a1")),
        ("file:///data/a1", FileSource(Path("/data/a1"))),
        ("https://h.example/a.tar.gz", HttpsSource("https://h.example/a.tar.gz", "tar")),
        ("https://h.example/a.zip", HttpsSource("https://h.example/a.zip", "zip")),
    ],
)
def test_parse_source(uri: str, expected: object) -> None:
    assert parse_source(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "hf://justname",
        "s3://A_Bucket/x",
        "pvc://claim/../etc",
        "file://host/x",
        "ftp://x/y",
        "https://h.example/adapter.bin",
    ],
)
def test_parse_source_rejects(uri: str) -> None:
    with pytest.raises(SourceError) as err:
        parse_source(uri)
    assert err.value.reason == "InvalidSource"


def test_file_and_pvc_sources_need_no_copy(tmp_path: Path) -> None:
    fetcher = _fetcher(tmp_path)
    (tmp_path / "a1").mkdir()
    assert asyncio.run(fetcher.fetch("ns", "a1", f"file://{tmp_path}/a1")) == tmp_path / "a1"
    with pytest.raises(SourceError, match="no such file"):
        asyncio.run(fetcher.fetch("ns", "a1", f"file://{tmp_path}/missing"))
    got = asyncio.run(fetcher.fetch("ns", "a1", "pvc://loras/team/a1"))
    assert got == fetcher.pvc_root / "loras" / "team" / "a1"


# --------------------------------------------------------------------------------------------------
# https archives from a local server (plain HTTP: the fetcher is told so for this host only)


def _run_fetch(fetcher: AdapterFetcher, url: str) -> Path:
    return asyncio.run(fetcher.fetch("ns", "a", url))


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_https_archive_is_downloaded_and_extracted(
    http_root: tuple[Path, str], tmp_path: Path, kind: str
) -> None:
    root, base = http_root
    files = {f"lora/{k}": v for k, v in ADAPTER_FILES.items()}
    (root / f"a.{kind}").write_bytes(_tar_gz(files) if kind == "tar.gz" else _zip(files))
    fetcher = _fetcher(tmp_path)
    path = _run_fetch(fetcher, f"{base}/a.{kind}")
    assert (path / "lora" / "adapter_config.json").read_bytes() == ADAPTER_FILES[
        "adapter_config.json"
    ]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".partial-")]


def test_https_missing_archive_is_a_clear_error(
    http_root: tuple[Path, str], tmp_path: Path
) -> None:
    _, base = http_root
    with pytest.raises(SourceError, match="HTTP 404") as err:
        _run_fetch(_fetcher(tmp_path), f"{base}/nothing.tar.gz")
    assert err.value.reason == "SourceUnavailable"
    assert not list((tmp_path / "cache" / "ns" / "a").iterdir())  # nothing half-written left


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(SourceError, match="ConnectError"):
        _run_fetch(_fetcher(tmp_path), f"https://{HOST}:{port}/a.tar.gz")


def test_tar_with_path_traversal_is_refused(http_root: tuple[Path, str], tmp_path: Path) -> None:
    root, base = http_root
    (root / "evil.tar.gz").write_bytes(_tar_gz({"../../escape.txt": b"x"}))
    with pytest.raises(SourceError, match="unsafe path") as err:
        _run_fetch(_fetcher(tmp_path), f"{base}/evil.tar.gz")
    assert err.value.reason == "UnsafeArchive"
    assert not (tmp_path / "escape.txt").exists()


def test_tar_with_symlink_is_refused(http_root: tuple[Path, str], tmp_path: Path) -> None:
    root, base = http_root
    link = tarfile.TarInfo("lora/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    (root / "link.tar.gz").write_bytes(_tar_gz(ADAPTER_FILES, [link]))
    with pytest.raises(SourceError, match="link or special file"):
        _run_fetch(_fetcher(tmp_path), f"{base}/link.tar.gz")


def test_zip_with_absolute_path_is_refused(http_root: tuple[Path, str], tmp_path: Path) -> None:
    root, base = http_root
    (root / "abs.zip").write_bytes(_zip({"/abs.txt": b"x"}))
    with pytest.raises(SourceError, match="unsafe path"):
        _run_fetch(_fetcher(tmp_path), f"{base}/abs.zip")


def test_size_limits_are_enforced(http_root: tuple[Path, str], tmp_path: Path) -> None:
    root, base = http_root
    # a zip bomb in miniature: 1 MB of zeros compresses to about 1 KB
    (root / "bomb.zip").write_bytes(_zip({"zeros": b"\0" * 1_000_000}))
    with pytest.raises(SourceError, match="unpacks to more than") as err:
        _run_fetch(_fetcher(tmp_path, max_bytes=100_000), f"{base}/bomb.zip")
    assert err.value.reason == "SourceTooLarge"
    (root / "big.tar.gz").write_bytes(os.urandom(200_000))
    with pytest.raises(SourceError, match="bytes"):
        _run_fetch(_fetcher(tmp_path, max_bytes=100_000), f"{base}/big.tar.gz")
    (root / "many.tar.gz").write_bytes(_tar_gz({f"f{i}": b"x" for i in range(20)}))
    with pytest.raises(SourceError, match="more than 10 files"):
        _run_fetch(_fetcher(tmp_path, max_files=10), f"{base}/many.tar.gz")


# --------------------------------------------------------------------------------------------------
# s3 against moto's server


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    server.start()
    yield f"http://{HOST}:{port}"
    server.stop()


S3_CREDS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_REGION": "us-east-1",
}


def test_s3_prefix_is_downloaded(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    creds = {**S3_CREDS, "AWS_ENDPOINT_URL": s3_endpoint}
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket="loras")
    for name, data in ADAPTER_FILES.items():
        s3.put_object(Bucket="loras", Key=f"team/sql-lora/{name}", Body=data)
    s3.put_object(Bucket="loras", Key="team/other/adapter_config.json", Body=b"{}")
    fetcher = _fetcher(tmp_path)
    path = asyncio.run(fetcher.fetch("ns", "sql", "s3://loras/team/sql-lora", creds))
    assert sorted(p.name for p in path.iterdir()) == sorted(ADAPTER_FILES)
    assert (path / "adapter_model.safetensors").read_bytes() == ADAPTER_FILES[
        "adapter_model.safetensors"
    ]
    # a second fetch reuses the finished download
    assert asyncio.run(fetcher.fetch("ns", "sql", "s3://loras/team/sql-lora", creds)) == path
    with pytest.raises(SourceError, match="no objects under the prefix"):
        asyncio.run(fetcher.fetch("ns", "none", "s3://loras/team/absent", creds))
    with pytest.raises(SourceError, match="NoSuchBucket"):
        asyncio.run(fetcher.fetch("ns", "nb", "s3://no-bucket/x", creds))
