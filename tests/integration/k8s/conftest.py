"""Fixtures for tests against a real Kubernetes control plane (``deploy/local-cluster``).

The cluster (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok with fake GPU
nodes, and the pod runner) runs in a private network namespace: its API server and pod IPs are
reachable only inside it. Tests reach it two ways:

* ``cluster.kubectl(...)`` / ``cluster.run(...)`` run a command through
  ``deploy/local-cluster/exec`` (inside the namespace, ``KUBECONFIG`` set);
* ``with cluster.netns():`` moves the calling thread into the namespace (``setns``), so Python
  clients (httpx, kubernetes_asyncio) opened inside the block talk to pod IPs and the API server.

One cluster per test session, in its own state directory and namespace (so it never collides with a
developer's ``deploy/local-cluster/up``); ``k8s_namespace`` gives each test a fresh Kubernetes
namespace. The tests are marked ``k8s`` and skip unless the binaries are in the cache
(``deploy/local-cluster/build``) or ``SHOAL_K8S=1`` is set (then the session builds them first).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from k8s_local_cluster import LOCAL_CLUSTER, Cluster

K8S_VERSION = "v1.36.3"
CACHE_BIN = (
    Path(os.environ.get("SHOAL_CACHE", Path.home() / ".cache" / "shoal"))
    / f"k8s-{K8S_VERSION}"
    / "bin"
)
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kubectl",
)
HERE = Path(__file__).resolve().parent


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if not os.access(CACHE_BIN / b, os.X_OK)]


def _skip_reason() -> str | None:
    if os.environ.get("SHOAL_K8S") == "0":
        return "SHOAL_K8S=0"
    if os.geteuid() != 0:
        return "the local Kubernetes cluster needs root (unshare -n, nsenter)"
    for tool in ("unshare", "nsenter", "ip", "openssl"):
        if shutil.which(tool) is None:
            return f"the local Kubernetes cluster needs {tool}"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"cannot create a network namespace (unshare -n: {probe.stderr.strip()})"
    missing = _missing_binaries()
    if missing and os.environ.get("SHOAL_K8S") != "1":
        return (
            f"Kubernetes binaries not built ({', '.join(missing)} missing under {CACHE_BIN}); "
            "run deploy/local-cluster/build or set SHOAL_K8S=1 to build them in the test session"
        )
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "k8s: runs against the local Kubernetes control plane (deploy/local-cluster); skipped "
        "unless its binaries are cached or SHOAL_K8S=1",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    # A cold build (SHOAL_K8S=1, nothing cached) runs inside the first test's setup.
    timeout = 600 if not _missing_binaries() else 3600
    for item in items:
        if HERE not in Path(str(item.path)).parents:
            continue
        item.add_marker(pytest.mark.k8s)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(timeout))
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return f"(no {path})"


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Build (or reuse the cached binaries), start the local cluster, stop it at the end."""
    state = tmp_path_factory.mktemp("k8s-cluster")
    env = {**os.environ, "SHOAL_CLUSTER_DIR": str(state)}
    log = state.parent / f"{state.name}-up.log"
    started = time.monotonic()
    with open(log, "w") as out:
        up = subprocess.run(
            [str(LOCAL_CLUSTER / "up")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(state.parent),
            timeout=3300,
            check=False,
        )
    try:
        if up.returncode != 0:
            pytest.fail(f"deploy/local-cluster/up exited {up.returncode}:\n{_tail(log)}")
        holder = int((state / "pids" / "netns-holder").read_text())
        print(f"local cluster up in {time.monotonic() - started:.1f}s (state {state})")
        yield Cluster(state, state / "kubeconfig", holder, env)
    finally:
        subprocess.run(
            [str(LOCAL_CLUSTER / "down")], env=env, capture_output=True, timeout=120, check=False
        )


@pytest.fixture
def k8s_namespace(k8s_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (without waiting)."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base or 't'}-{uuid.uuid4().hex[:6]}"
    k8s_cluster.kubectl("create", "namespace", name)
    # pods need the namespace's default service account (the controller manager creates it)
    deadline = time.monotonic() + 30
    while k8s_cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False) == "":
        if time.monotonic() > deadline:
            raise AssertionError(f"no default service account in namespace {name} after 30s")
        time.sleep(0.2)
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
