"""Calibrate the engine simulator's performance model against published vLLM measurements.

Every reference point is a published vLLM benchmark run. The script replays the published
scenario step by step through :class:`shoal.sim.perf.PerfModel` (the same steps vLLM's scheduler
would run) and compares the predicted TTFT and per-token latency with the published ones.

    python bench/calibrate.py            # print the markdown table
    python bench/calibrate.py --write    # also rewrite the table in docs/calibration.md

``tests/unit/test_perf.py`` imports ``REFERENCE_POINTS`` and ``predict`` from here and asserts
that every point lands within ``TOLERANCE``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shoal.sim.catalog import get_gpu, get_model
from shoal.sim.perf import (
    VLLM_V05_EFFICIENCY,
    VLLM_V1_EFFICIENCY,
    BatchShape,
    Efficiency,
    PerfModel,
)

TOLERANCE = 0.15

ENGINES: dict[str, Efficiency] = {
    "vllm-0.5": VLLM_V05_EFFICIENCY,
    "vllm-nightly": VLLM_V1_EFFICIENCY,
    # vLLM 0.6.0 is the release that cut the host overheads the modern preset models, so its
    # runs use that preset. Its client-observed request overhead is a property of the benchmark
    # client and API server, not of the engine step: Lambda's v0.6.0 runs used the same harness
    # and machines as their v0.5.4 runs, so they take the 20 ms fitted there instead of the modern
    # preset's unfitted 10 ms estimate (docs/calibration.md).
    "vllm-0.6": dataclasses.replace(
        VLLM_V1_EFFICIENCY, request_overhead_s=VLLM_V05_EFFICIENCY.request_overhead_s
    ),
}

_LAMBDA_REPO = "https://github.com/LambdaLabsML/vllm-benchmark"
# The 10 ShareGPT prompts (fixed seed) that every Lambda "prompt_10" run sends at once.
_LAMBDA_INPUT_LENS = (14, 30, 28, 12, 375, 29, 487, 369, 5, 236)
# The same 10 prompts through the Llama 3 tokenizer (Lambda's vLLM v0.6.0 runs in results/).
_LAMBDA_LLAMA3_INPUT_LENS = (13, 25, 27, 10, 329, 29, 399, 328, 4, 205)


@dataclass(frozen=True, slots=True)
class BurstScenario:
    """``benchmark_serving.py --request-rate inf``: all prompts arrive at once, no chunked
    prefill (vLLM 0.5 default for short contexts; vLLM 0.6.0 cannot chunk with multi-step),
    prefills scheduled before decodes.

    ``prefill_groups`` lists which prompts each prefill step took, as the published per-request
    TTFTs show it (a prompt that reached the engine first is prefilled alone).

    ``scheduler_steps`` is vLLM 0.6.0's ``--num-scheduler-steps``: the scheduler runs once per
    ``scheduler_steps`` decode steps, the batch is fixed for that run (a sequence that finishes
    inside it rides along to its end) and its tokens are streamed when it ends, so host work is
    paid once per run and a request's last token arrives at the end of the run that produced it.
    The published per-request inter-token latencies (one per run, ~10 decode steps long) show it.
    """

    input_lens: tuple[int, ...]
    output_lens: tuple[int, ...]
    prefill_groups: tuple[tuple[int, ...], ...]
    scheduler_steps: int = 1


@dataclass(frozen=True, slots=True)
class LatencyScenario:
    """``benchmark_latency.py``: one offline batch of identical prompts generated to a fixed
    length; the published figure is the batch's end-to-end latency."""

    batch_size: int
    input_len: int
    output_len: int


@dataclass(frozen=True, slots=True)
class KnownMiss:
    """A published figure the model does not reproduce within ``TOLERANCE``, kept in the table
    with the reason rather than fitted away (docs/calibration.md, "Misses")."""

    metric: Literal["ttft", "per_token"]
    reason: str


@dataclass(frozen=True, slots=True)
class ReferencePoint:
    name: str
    model: str
    gpu: str
    tensor_parallel: int
    engine: str  # key of ENGINES: which host-overhead generation of vLLM ran it
    scenario: BurstScenario | LatencyScenario
    # Published figures in milliseconds. TTFT: median; per-token: mean TPOT of the run (burst) or
    # end-to-end latency / output tokens (latency benchmark). None where not published.
    ttft_ms: float | None
    per_token_ms: float
    source: str
    known_miss: KnownMiss | None = None


REFERENCE_POINTS: tuple[ReferencePoint, ...] = (
    ReferencePoint(
        name="mistral7b-h100-tp1",
        model="mistralai/Mistral-7B-Instruct-v0.3",
        gpu="H100",
        tensor_parallel=1,
        engine="vllm-0.5",
        scenario=BurstScenario(
            input_lens=_LAMBDA_INPUT_LENS,
            output_lens=(129, 883, 273, 169, 0, 732, 10, 26, 8, 57),
            prefill_groups=((5,), (0, 1, 2, 3, 4, 6, 7, 8, 9)),
        ),
        ttft_ms=61.55,
        per_token_ms=8.55,
        source=(
            "Lambda Labs, vllm-benchmark (vLLM v0.5.4), "
            f"{_LAMBDA_REPO}/blob/main/results_v0/prompt_10/1xH100-80GB-SXM/"
            "Mistral-7B-Instruct-v0.3_tp1_len4000.json"
        ),
    ),
    ReferencePoint(
        name="mistral7b-a100-80gb-tp1",
        model="mistralai/Mistral-7B-Instruct-v0.3",
        gpu="A100-80GB",
        tensor_parallel=1,
        engine="vllm-0.5",
        scenario=BurstScenario(
            input_lens=_LAMBDA_INPUT_LENS,
            output_lens=(129, 883, 273, 165, 0, 928, 10, 26, 8, 56),
            prefill_groups=((5,), (0, 1, 2, 3, 4, 6, 7, 8, 9)),
        ),
        ttft_ms=142.87,
        per_token_ms=13.91,
        source=(
            "Lambda Labs, vllm-benchmark (vLLM v0.5.4), "
            f"{_LAMBDA_REPO}/blob/main/results_v0/prompt_10/1xA100-80GB-SXM/"
            "Mistral-7B-Instruct-v0.3_tp1_len2000.json"
        ),
    ),
    ReferencePoint(
        name="mistral7b-h100-tp2",
        model="mistralai/Mistral-7B-Instruct-v0.3",
        gpu="H100",
        tensor_parallel=2,
        engine="vllm-0.5",
        scenario=BurstScenario(
            input_lens=_LAMBDA_INPUT_LENS,
            output_lens=(129, 883, 273, 169, 0, 735, 10, 26, 8, 18),
            prefill_groups=((0, 1, 2, 3, 4, 5, 6, 7, 8, 9),),
        ),
        ttft_ms=49.19,
        per_token_ms=6.81,
        source=(
            "Lambda Labs, vllm-benchmark (vLLM v0.5.4), "
            f"{_LAMBDA_REPO}/blob/main/results_v0/prompt_10/2xH100-80GB-SXM/"
            "Mistral-7B-Instruct-v0.3_tp2_len2000.json"
        ),
    ),
    ReferencePoint(
        name="mistral7b-a100-80gb-tp2",
        model="mistralai/Mistral-7B-Instruct-v0.3",
        gpu="A100-80GB",
        tensor_parallel=2,
        engine="vllm-0.5",
        scenario=BurstScenario(
            input_lens=_LAMBDA_INPUT_LENS,
            output_lens=(129, 883, 273, 182, 0, 928, 10, 26, 8, 56),
            prefill_groups=((0, 5), (1, 2, 3, 4, 6, 7, 8, 9)),
        ),
        ttft_ms=107.58,
        per_token_ms=10.67,
        source=(
            "Lambda Labs, vllm-benchmark (vLLM v0.5.4), "
            f"{_LAMBDA_REPO}/blob/main/results_v0/prompt_10/2xA100-80GB-SXM/"
            "Mistral-7B-Instruct-v0.3_tp2_len2000.json"
        ),
    ),
    ReferencePoint(
        name="llama8b-h100-tp1-burst",
        model="meta-llama/Llama-3.1-8B-Instruct",
        gpu="H100",
        tensor_parallel=1,
        engine="vllm-0.6",
        scenario=BurstScenario(
            input_lens=_LAMBDA_LLAMA3_INPUT_LENS,
            output_lens=(120, 429, 233, 194, 101, 741, 9, 3, 6, 31),
            prefill_groups=((0, 1, 2, 3, 4, 5, 6, 7, 8, 9),),
            scheduler_steps=10,
        ),
        ttft_ms=62.19,
        per_token_ms=11.11,
        source=(
            "Lambda Labs, vllm-benchmark (vLLM v0.6.0, --num-scheduler-steps 10; "
            "Meta-Llama-3-8B-Instruct, same shapes as 3.1), "
            f"{_LAMBDA_REPO}/blob/main/results/prompt_10/1xH100-80GB-SXM/"
            "Meta-Llama-3-8B-Instruct_tp1_len2048.json"
        ),
    ),
    ReferencePoint(
        name="llama8b-a100-80gb-tp1-burst",
        model="meta-llama/Llama-3.1-8B-Instruct",
        gpu="A100-80GB",
        tensor_parallel=1,
        engine="vllm-0.6",
        scenario=BurstScenario(
            input_lens=_LAMBDA_LLAMA3_INPUT_LENS,
            output_lens=(120, 507, 233, 194, 101, 741, 9, 3, 6, 31),
            prefill_groups=((0, 1, 2, 3, 4, 5, 6, 7, 8, 9),),
            scheduler_steps=10,
        ),
        ttft_ms=126.73,
        per_token_ms=18.03,
        source=(
            "Lambda Labs, vllm-benchmark (vLLM v0.6.0, --num-scheduler-steps 10; "
            "Meta-Llama-3-8B-Instruct, same shapes as 3.1), "
            f"{_LAMBDA_REPO}/blob/main/results/prompt_10/1xA100-80GB-SXM/"
            "Meta-Llama-3-8B-Instruct_tp1_len2048.json"
        ),
    ),
    ReferencePoint(
        name="llama70b-h100-tp2-burst",
        model="meta-llama/Llama-3.1-70B-Instruct",
        gpu="H100",
        tensor_parallel=2,
        engine="vllm-0.6",
        scenario=BurstScenario(
            input_lens=_LAMBDA_LLAMA3_INPUT_LENS,
            output_lens=(120, 661, 233, 194, 101, 741, 0, 0, 6, 35),
            prefill_groups=((0, 1, 2, 3, 4, 5, 6, 7, 8, 9),),
            scheduler_steps=10,
        ),
        ttft_ms=218.92,
        per_token_ms=33.51,
        source=(
            "Lambda Labs, vllm-benchmark (vLLM v0.6.0, --num-scheduler-steps 10; "
            "Meta-Llama-3-70B-Instruct, same shapes as 3.1), "
            f"{_LAMBDA_REPO}/blob/main/results/prompt_10/2xH100-80GB-SXM/"
            "Meta-Llama-3-70B-Instruct_tp2_len2048.json"
        ),
        known_miss=KnownMiss(
            metric="per_token",
            reason=(
                "a 10-step decode run takes 287 ms (28.7 ms/step): 69.5 GB of weights per GPU "
                "streamed at 72% of HBM bandwidth, above the shared memory efficiency (0.58) "
                "that the 7-8B points need; see docs/calibration.md"
            ),
        ),
    ),
    ReferencePoint(
        name="llama70b-a100-80gb-tp2-burst",
        model="meta-llama/Llama-3.1-70B-Instruct",
        gpu="A100-80GB",
        tensor_parallel=2,
        engine="vllm-0.6",
        scenario=BurstScenario(
            input_lens=_LAMBDA_LLAMA3_INPUT_LENS,
            output_lens=(120, 723, 233, 194, 101, 741, 0, 0, 6, 31),
            prefill_groups=((0, 1, 2, 3, 4, 5, 6, 7, 8, 9),),
            scheduler_steps=10,
        ),
        ttft_ms=506.39,
        per_token_ms=58.69,
        source=(
            "Lambda Labs, vllm-benchmark (vLLM v0.6.0, --num-scheduler-steps 10; "
            "Meta-Llama-3-70B-Instruct, same shapes as 3.1), "
            f"{_LAMBDA_REPO}/blob/main/results/prompt_10/2xA100-80GB-SXM/"
            "Meta-Llama-3-70B-Instruct_tp2_len2048.json"
        ),
        known_miss=KnownMiss(
            metric="per_token",
            reason=(
                "a 10-step decode run takes 490 ms (49 ms/step): 69.5 GB of weights per GPU "
                "streamed at 70% of HBM bandwidth, above the shared memory efficiency (0.58) "
                "that the 7-8B points need; see docs/calibration.md"
            ),
        ),
    ),
    ReferencePoint(
        name="llama8b-h200-tp1",
        model="meta-llama/Llama-3.1-8B-Instruct",
        gpu="H200",
        tensor_parallel=1,
        engine="vllm-nightly",
        scenario=LatencyScenario(batch_size=8, input_len=32, output_len=128),
        ttft_ms=None,
        per_token_ms=833.42 / 128,
        source=(
            "vLLM nightly performance benchmark, latency_llama8B_tp1 (H200), "
            "https://buildkite.com/vllm/performance-benchmark/builds/9515"
        ),
    ),
    ReferencePoint(
        name="llama70b-h200-tp4",
        model="meta-llama/Llama-3.1-70B-Instruct",
        gpu="H200",
        tensor_parallel=4,
        engine="vllm-nightly",
        scenario=LatencyScenario(batch_size=8, input_len=32, output_len=128),
        ttft_ms=None,
        per_token_ms=2077.53 / 128,
        source=(
            "vLLM nightly performance benchmark, latency_llama70B_tp4 (H200; Llama-3-70B, same "
            "shapes as 3.1), https://buildkite.com/vllm/performance-benchmark/builds/9515"
        ),
    ),
    ReferencePoint(
        name="llama8b-h100-tp1",
        model="meta-llama/Llama-3.1-8B-Instruct",
        gpu="H100",
        tensor_parallel=1,
        engine="vllm-nightly",
        scenario=LatencyScenario(batch_size=8, input_len=32, output_len=128),
        ttft_ms=None,
        per_token_ms=997.54 / 128,
        source=(
            "vLLM nightly performance benchmark, latency_llama8B_tp1 (8xH100 node); "
            "buildkite vllm/performance-benchmark results page as crawled"
        ),
    ),
    ReferencePoint(
        name="llama70b-h100-tp4",
        model="meta-llama/Llama-3.1-70B-Instruct",
        gpu="H100",
        tensor_parallel=4,
        engine="vllm-nightly",
        scenario=LatencyScenario(batch_size=8, input_len=32, output_len=128),
        ttft_ms=None,
        per_token_ms=2444.47 / 128,
        source=(
            "vLLM nightly performance benchmark, latency_llama70B_tp4 (8xH100 node); "
            "buildkite vllm/performance-benchmark results page as crawled"
        ),
    ),
    ReferencePoint(
        name="llama8b-a100-80gb-tp1",
        model="meta-llama/Llama-3.1-8B-Instruct",
        gpu="A100-80GB",
        tensor_parallel=1,
        engine="vllm-nightly",
        scenario=LatencyScenario(batch_size=8, input_len=32, output_len=128),
        ttft_ms=None,
        per_token_ms=1585.43 / 128,
        source=(
            "vLLM nightly performance benchmark, latency_llama8B_tp1 (A100-SXM4-80GB); "
            "buildkite vllm/performance-benchmark results page as crawled"
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class Prediction:
    ttft_ms: float | None
    per_token_ms: float


def _prefill_shape(lens: list[int]) -> BatchShape:
    """A step that prefills whole prompts from an empty cache."""
    return BatchShape(
        prefill_tokens=sum(lens),
        prefill_attention_pairs=sum(n * (n + 1) // 2 for n in lens),
        prefill_context_tokens=sum(lens),
    )


def _host_time(perf: PerfModel, decode_seqs: int) -> float:
    """Host time of one step (scheduling, input preparation, broadcasting to TP workers)."""
    eff = perf.efficiency
    tp = eff.tp_step_overhead_s if perf.num_gpus > 1 else 0.0
    return eff.step_overhead_s + eff.per_seq_overhead_s * decode_seqs + tp


def _predict_burst(perf: PerfModel, scenario: BurstScenario) -> Prediction:
    inputs, outputs = scenario.input_lens, scenario.output_lens
    now = 0.0
    first_token: dict[int, float] = {}
    # Prefill steps first: vLLM 0.5/0.6 schedule waiting prompts before running decodes (a prefill
    # is always a single step, also with multi-step scheduling).
    for group in scenario.prefill_groups:
        now += perf.step_time(_prefill_shape([inputs[i] for i in group]))
        for i in group:
            first_token[i] = now
    produced = {i: 1 for i in first_token if outputs[i] > 0}
    finish: dict[int, float] = {}
    while True:
        active = [i for i in produced if produced[i] < outputs[i]]
        if not active:
            break
        # One scheduler run: `scheduler_steps` decode steps over a fixed batch; host work once.
        for step in range(scenario.scheduler_steps):
            shape = BatchShape(
                decode_seqs=len(active),
                decode_context_tokens=sum(inputs[i] + produced[i] for i in active),
            )
            now += perf.step_time(shape) - (_host_time(perf, len(active)) if step else 0.0)
            for i in active:
                produced[i] += 1
        # Tokens are streamed when the run ends.
        for i in active:
            if produced[i] >= outputs[i]:
                finish[i] = now
    overhead = perf.efficiency.request_overhead_s
    # As benchmark_serving.py computes them: a request that streamed no text counts with TTFT 0;
    # TPOT only for requests with more than one output token.
    ttfts = [first_token[i] + overhead if outputs[i] > 0 else 0.0 for i in first_token]
    tpots = [(finish[i] - first_token[i]) / (outputs[i] - 1) for i in finish if outputs[i] > 1]
    return Prediction(
        ttft_ms=statistics.median(ttfts) * 1e3,
        per_token_ms=statistics.fmean(tpots) * 1e3,
    )


def _predict_latency(perf: PerfModel, scenario: LatencyScenario) -> Prediction:
    b, n = scenario.batch_size, scenario.input_len
    total = perf.step_time(_prefill_shape([n] * b))
    for generated in range(1, scenario.output_len):
        total += perf.step_time(
            BatchShape(decode_seqs=b, decode_context_tokens=b * (n + generated))
        )
    return Prediction(ttft_ms=None, per_token_ms=total / scenario.output_len * 1e3)


def predict(point: ReferencePoint, efficiency: Efficiency | None = None) -> Prediction:
    """Replay the point's published scenario through the performance model."""
    perf = PerfModel(
        get_model(point.model),
        get_gpu(point.gpu),
        num_gpus=point.tensor_parallel,
        efficiency=efficiency if efficiency is not None else ENGINES[point.engine],
    )
    if isinstance(point.scenario, BurstScenario):
        return _predict_burst(perf, point.scenario)
    return _predict_latency(perf, point.scenario)


def relative_error(predicted: float, published: float) -> float:
    return (predicted - published) / published


def markdown_table() -> str:
    header = (
        "| point | model | GPU | TP | vLLM | scenario | TTFT published (ms) | TTFT predicted (ms) "
        "| TTFT error | per-token published (ms) | per-token predicted (ms) | per-token error |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for point in REFERENCE_POINTS:
        pred = predict(point)
        if isinstance(point.scenario, BurstScenario):
            sc = point.scenario
            steps = f", {sc.scheduler_steps} scheduler steps" if sc.scheduler_steps > 1 else ""
            scenario = (
                f"{len(sc.input_lens)} ShareGPT prompts at once ({sum(sc.input_lens)} input tok)"
                f"{steps}, median TTFT, mean TPOT"
            )
        else:
            ls = point.scenario
            scenario = (
                f"offline batch {ls.batch_size}, {ls.input_len} in / {ls.output_len} out, "
                "e2e / output tokens"
            )
        if point.ttft_ms is not None and pred.ttft_ms is not None:
            ttft = (
                f"{point.ttft_ms:.1f} | {pred.ttft_ms:.1f} | "
                f"{relative_error(pred.ttft_ms, point.ttft_ms):+.1%}{_miss_mark(point, 'ttft')}"
            )
        else:
            ttft = "n/p | - | -"
        rows.append(
            f"| {point.name} | {point.model.split('/')[-1]} | {point.gpu} | "
            f"{point.tensor_parallel} | {point.engine} | {scenario} | {ttft} | "
            f"{point.per_token_ms:.2f} | {pred.per_token_ms:.2f} | "
            f"{relative_error(pred.per_token_ms, point.per_token_ms):+.1%}"
            f"{_miss_mark(point, 'per_token')} |"
        )
    sources = "\n".join(f"- `{p.name}`: {p.source}" for p in REFERENCE_POINTS)
    misses = "\n".join(
        f"- `{p.name}` ({p.known_miss.metric}): {p.known_miss.reason}"
        for p in REFERENCE_POINTS
        if p.known_miss is not None
    )
    legend = (
        "\n\nn/p: not published by the source. **miss**: outside the "
        f"{TOLERANCE:.0%} tolerance, kept with its reason:\n\n{misses}\n\nSources:\n\n"
    )
    return header + "\n".join(rows) + legend + sources + "\n"


def _miss_mark(point: ReferencePoint, metric: str) -> str:
    miss = point.known_miss
    return " **miss**" if miss is not None and miss.metric == metric else ""


def errors(point: ReferencePoint) -> dict[str, float]:
    """Relative error of each published metric of the point ("ttft", "per_token")."""
    pred = predict(point)
    out = {"per_token": relative_error(pred.per_token_ms, point.per_token_ms)}
    if point.ttft_ms is not None and pred.ttft_ms is not None:
        out["ttft"] = relative_error(pred.ttft_ms, point.ttft_ms)
    return out


def is_known_miss(point: ReferencePoint, metric: str) -> bool:
    return point.known_miss is not None and point.known_miss.metric == metric


def pairs_within_tolerance() -> set[tuple[str, str]]:
    """Distinct (model, GPU) pairs with a point whose published TTFT and per-token latency are
    both reproduced within ``TOLERANCE``."""
    return {
        (p.model, p.gpu)
        for p in REFERENCE_POINTS
        if len(errs := errors(p)) == 2 and all(abs(e) <= TOLERANCE for e in errs.values())
    }


_BEGIN = "<!-- calibration-table:begin -->"
_END = "<!-- calibration-table:end -->"


def write_table(doc: Path, table: str) -> None:
    text = doc.read_text()
    start, end = text.index(_BEGIN) + len(_BEGIN), text.index(_END)
    doc.write_text(text[:start] + "\n" + table + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--write", action="store_true", help="rewrite the docs/calibration.md table"
    )
    parser.add_argument(
        "--doc", type=Path, default=Path(__file__).resolve().parent.parent / "docs/calibration.md"
    )
    args = parser.parse_args(argv)
    table = markdown_table()
    print(table)
    worst = 0.0
    for point in REFERENCE_POINTS:
        for metric, error in errors(point).items():
            if not is_known_miss(point, metric):
                worst = max(worst, abs(error))
    pairs = pairs_within_tolerance()
    print(f"worst error outside recorded misses: {worst:.1%} (tolerance {TOLERANCE:.0%})")
    print(f"(model, GPU) pairs within tolerance on both TTFT and per-token latency: {len(pairs)}")
    if args.write:
        write_table(args.doc, table)
        print(f"wrote {args.doc}")
    return 0 if worst <= TOLERANCE and len(pairs) >= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
