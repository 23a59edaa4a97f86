"""``shoal bench``: open-loop workloads, a light HTTP load generator and its reports."""

from shoal.bench.client import RequestResult, RunResult, run_open_loop
from shoal.bench.report import Summary, format_table, summarize
from shoal.bench.workloads import BenchRequest, arrival_times

__all__ = [
    "BenchRequest",
    "RequestResult",
    "RunResult",
    "Summary",
    "arrival_times",
    "format_table",
    "run_open_loop",
    "summarize",
]
