"""Shoal: a Kubernetes-native control plane for LLM serving.

The ``shoal`` package holds what every component shares: block hashing, the KV event wire
format, the CLI. Components live in ``shoal.sim``, ``shoal.router``, ``shoal.operator``,
``shoal.autoscaler`` and ``shoal.kvcache``.
"""

__version__ = "0.1.0"
