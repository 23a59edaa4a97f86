#!/usr/bin/env python3
"""Render deploy/local-cluster/nodes.yaml (pools of fake GPU nodes) into Node manifests for kwok.

    render_nodes.py nodes.yaml > nodes.rendered.yaml      # then: kubectl apply -f -

Each node: annotation ``kwok.x-k8s.io/node: fake`` (kwok manages it), labels ``type: kwok``,
``nvidia.com/gpu.product``, ``nvidia.com/gpu.count`` and ``kubernetes.io/hostname``; a taint that
only GPU workloads tolerate; capacity = allocatable (nvidia.com/gpu, cpu, memory, pods); and a
``spec.podCIDR`` (the next /24 of --cidr, skipping the first, which holds the API server).
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import sys
from typing import Any

import yaml


def render(spec: dict[str, Any], cidr: str = "10.244.0.0/16") -> list[dict[str, Any]]:
    defaults = spec.get("defaults") or {}
    subnets = ipaddress.ip_network(cidr).subnets(new_prefix=24)
    next(subnets)  # x.x.0.0/24 holds the API server's address
    nodes: list[dict[str, Any]] = []
    seen: set[str] = set()
    for pool in spec.get("pools") or []:
        for key in ("name", "count", "product", "gpus"):
            if key not in pool:
                raise SystemExit(f"nodes.yaml: pool {pool!r} lacks {key!r}")
        for i in range(int(pool["count"])):
            name = f"{pool['name']}-{i}"
            if name in seen:
                raise SystemExit(f"nodes.yaml: duplicate node name {name}")
            seen.add(name)
            labels = {
                **(defaults.get("labels") or {}),
                **(pool.get("labels") or {}),
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "nvidia.com/gpu.product": str(pool["product"]),
                "nvidia.com/gpu.count": str(pool["gpus"]),
                "shoal.dev/pool": str(pool["name"]),
            }
            resources = {
                "cpu": str(pool.get("cpu", "32")),
                "memory": str(pool.get("memory", "256Gi")),
                "pods": str(pool.get("pods", "110")),
                "nvidia.com/gpu": str(pool["gpus"]),
                "ephemeral-storage": str(pool.get("ephemeralStorage", "1Ti")),
            }
            taints = copy.deepcopy(pool.get("taints", defaults.get("taints") or []))
            nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {
                            "kwok.x-k8s.io/node": "fake",
                            "node.alpha.kubernetes.io/ttl": "0",
                        },
                        "labels": labels,
                    },
                    "spec": {"podCIDR": str(next(subnets)), "taints": taints},
                    "status": {
                        "capacity": resources,
                        "allocatable": dict(resources),
                    },
                }
            )
    return nodes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("file", nargs="?", default="-")
    p.add_argument("--cidr", default="10.244.0.0/16")
    p.add_argument("--json", action="store_true", help="a v1 List as JSON instead of YAML")
    a = p.parse_args()
    if a.file == "-":
        text = sys.stdin.read()
    else:
        with open(a.file) as f:
            text = f.read()
    nodes = render(yaml.safe_load(text) or {}, a.cidr)
    if a.json:
        json.dump({"apiVersion": "v1", "kind": "List", "items": nodes}, sys.stdout, indent=1)
    else:
        yaml.safe_dump_all(nodes, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
