"""pd-bench throughput: B concurrent requests against the same requests one after another, per method, one run.

For each prompt length and method, `sequential` requests run one after another (the req/s every ratio divides
by); then, for each B, B requests are submitted at once from B threads, as a server's or LangChain `batch`'s
callers would, and the engine's scheduler batches them. Every request generates exactly `max_new_tokens` (EOS is
masked), so batched and sequential runs do the same work. Recorded per run: requests/s, output tokens/s, mean and
p95 time to first token (from submission), the scheduler's forward time split into prefill and decode, and peak
memory (see `measure`).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch

from ..engine import PromptDistillEngine
from . import measure, report
from .tasks import Probe

COLUMNS_NOTE = (
    "req/s and output tok/s over the run's wall time; ÷ seq: against the same method's sequential "
    "calls (B = 1 at a time, no overlap); TTFT from submission to first text, so it includes waiting "
    "for other requests' prefills; prefill share: the scheduler's forward time spent in prefill."
)


class GenerateEveryToken:
    """A `Constraint` that forbids EOS, so every request generates exactly its `max_new_tokens`."""

    def __init__(self, eos_ids: list[int]):
        self.eos_ids = eos_ids

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.eos_ids] = float("-inf")
        return scores

    def advance(self, token: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False


def run(
    engines: dict[str, PromptDistillEngine],
    probes_by_length: dict[int, list[Probe]],
    concurrency: list[int],
    sequential: int,
    max_new_tokens: int,
) -> list[dict]:
    """One record per (length, method, B), B = "sequential" for the baseline; probes are reused round-robin."""
    records = []
    for length, probes in probes_by_length.items():
        for name, engine in engines.items():
            _call(engine, probes[0], 2)  # warm-up
            runs = [("sequential", sequential)] + [(b, b) for b in concurrency]
            for b, count in runs:
                work = [probes[k % len(probes)] for k in range(count)]
                record = _measure(engine, work, max_new_tokens, concurrent=b != "sequential")
                records.append({"length": length, "method": name, "B": b, **record})
                print(report.table_line(_cells(records[-1], records)), flush=True)
    return records


def _call(engine: PromptDistillEngine, probe: Probe, max_new_tokens: int) -> tuple[float, object]:
    """(seconds to the first text, the result) of one streamed request."""
    started, first = time.perf_counter(), None
    stream = engine.stream(
        messages=probe.messages,
        query=probe.question,
        documents=[probe.context],
        max_new_tokens=max_new_tokens,
        constraint=GenerateEveryToken(engine.runtime.eos_ids),
    )
    for _ in stream:
        first = first or time.perf_counter() - started
    return first, stream.result


def _measure(engine: PromptDistillEngine, work: list[Probe], max_new_tokens: int, concurrent: bool) -> dict:
    scheduler = engine.scheduler
    before = Counter(scheduler.forward_seconds)

    def requests():
        if not concurrent:
            return [_call(engine, probe, max_new_tokens) for probe in work]
        with ThreadPoolExecutor(max_workers=len(work)) as pool:
            return list(pool.map(lambda probe: _call(engine, probe, max_new_tokens), work))

    started = time.perf_counter()
    outcomes, peak = measure._with_peak_memory(engine.device, requests)
    wall = time.perf_counter() - started
    forward = Counter(scheduler.forward_seconds)
    forward.subtract(before)
    ttfts = sorted(t for t, _ in outcomes)
    tokens = sum(result.output_tokens for _, result in outcomes)
    return {
        "requests": len(work),
        "wall_seconds": wall,
        "requests_per_second": len(work) / wall,
        "output_tokens_per_second": tokens / wall,
        "mean_ttft_seconds": statistics.fmean(ttfts),
        "p95_ttft_seconds": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "prefill_seconds": forward["prefill"],
        "decode_seconds": forward["decode"],
        "prompt_tokens": statistics.fmean(result.prompt_tokens for _, result in outcomes),
        "kept_tokens": statistics.fmean(result.kept_tokens for _, result in outcomes),
        "peak_memory_bytes": peak,
    }


def _baseline(record: dict, records: list[dict]) -> dict:
    return next(
        r
        for r in records
        if r["length"] == record["length"] and r["method"] == record["method"] and r["B"] == "sequential"
    )


HEADER = [
    "length",
    "method",
    "B",
    "kept / prompt",
    "req/s",
    "÷ seq",
    "out tok/s",
    "TTFT mean s",
    "TTFT p95 s",
    "prefill share",
    "peak MiB",
]


def _cells(record: dict, records: list[dict]) -> list:
    """One record's table cells; its ÷ seq is against the sequential record of its length and method in `records`."""
    forward = record["prefill_seconds"] + record["decode_seconds"]
    return [
        record["length"],
        record["method"],
        record["B"],
        f"{record['kept_tokens']:.0f} / {record['prompt_tokens']:.0f}",
        f"{record['requests_per_second']:.3f}",
        f"{record['requests_per_second'] / _baseline(record, records)['requests_per_second']:.2f}×",
        f"{record['output_tokens_per_second']:.1f}",
        f"{record['mean_ttft_seconds']:.2f}",
        f"{record['p95_ttft_seconds']:.2f}",
        f"{record['prefill_seconds'] / forward:.0%}" if forward else "–",
        "–" if record["peak_memory_bytes"] is None else f"{record['peak_memory_bytes'] / 2**20:.0f}",
    ]


def markdown_table(records: list[dict]) -> str:
    return report.markdown(HEADER, [_cells(r, records) for r in records])


def plot(records: list[dict], path) -> None:
    """Requests/s against B, one line per (method, length), the sequential rate dashed; a PNG at `path`."""
    plt = report._pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for length in sorted({r["length"] for r in records}):
        for method in dict.fromkeys(r["method"] for r in records):
            runs = [r for r in records if r["length"] == length and r["method"] == method]
            batched = [r for r in runs if r["B"] != "sequential"]
            (line,) = axis.plot(
                [r["B"] for r in batched],
                [r["requests_per_second"] for r in batched],
                marker="o",
                label=f"{method}, {length} tokens",
            )
            axis.axhline(
                _baseline(runs[0], runs)["requests_per_second"], color=line.get_color(), linestyle="--", linewidth=0.8
            )
    axis.set_xlabel("concurrent requests B")
    axis.set_ylabel("requests / s (dashed: sequential)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
