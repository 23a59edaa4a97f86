"""A handle on a running local Kubernetes cluster (deploy/local-cluster) for the k8s tests.

Kept apart from ``conftest.py`` under a unique module name so test modules can import it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
LOCAL_CLUSTER = REPO / "deploy" / "local-cluster"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@dataclass
class Cluster:
    """A running local cluster: where its state is and how to reach it."""

    state_dir: Path
    kubeconfig: Path
    holder_pid: int
    env: dict[str, str]

    # -- commands inside the namespace --

    def run(
        self, *argv: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the cluster's network namespace with KUBECONFIG set."""
        proc = subprocess.run(
            [str(LOCAL_CLUSTER / "exec"), *argv],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.run("kubectl", *args, input=input, check=check).stdout

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def apply(self, manifest: str | dict[str, Any], namespace: str | None = None) -> str:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=text)

    # -- this thread inside the namespace --

    @contextlib.contextmanager
    def netns(self) -> Iterator[None]:
        """Move the calling thread into the cluster's network namespace for the block. Sockets
        opened inside keep working there; threads started inside inherit the namespace."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/proc/{self.holder_pid}/ns/net", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)

    def pod_runner_state(self) -> dict[str, Any]:
        path = self.state_dir / "pod-runner.json"
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError):
            return {}
