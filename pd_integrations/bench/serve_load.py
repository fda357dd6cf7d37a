"""A bounded load against a running pd-serve: `pd-bench serve --url URL`.

The same needle prompts (one pass code hidden in ~4k tokens of CPython's help text each) go to the server at each
concurrency, once with PromptDistill (the served model's profile) and once with `method="full"`, streamed, so the
time to first token is when the first text arrives. Per concurrency and method: requests/s, p50/p95 time to first
token, errors, needles answered; and the server's resident memory before and after (`--server-pid`). Prints a
markdown table and writes every request's record as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from ..loading import DEFAULT_MODEL
from ..probes import NeedleProbe, needle_probe

METHODS = ("promptdistill", "full")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pd-bench serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    parser.add_argument("--api-key", help="the server's --api-key, if it has one")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the served model's name (default: %(default)s)")
    parser.add_argument("--tokenizer", help="tokenizer that sizes the prompts (default: the embedded model's)")
    parser.add_argument("--server-pid", type=int, help="the server's process id, to report its memory")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency and method")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=4000, help="context tokens per prompt (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one request may take")
    parser.add_argument("--out", type=Path, help="write every request's record here as JSON")
    return parser.parse_args(argv)


def load_tokenizer(name: str | None):
    from transformers import AutoTokenizer

    from ..loading import default_model_path

    return AutoTokenizer.from_pretrained(name or default_model_path())


def make_probes(tokenizer, count: int, tokens: int) -> list[NeedleProbe]:
    """`count` distinct prompts: pass codes at five depths, each in its own haystack window."""
    return [needle_probe(tokenizer, tokens, DEPTHS[i % len(DEPTHS)], seed=i) for i in range(count)]


def request_body(args: argparse.Namespace, probe: NeedleProbe, method: str) -> dict:
    return {
        "model": args.model,
        "messages": probe.messages(),
        "max_tokens": args.max_tokens,
        "stream": True,
        "temperature": 0,
        "promptdistill": {"query": probe.question, "documents": [probe.context], "method": method},
    }


async def one_request(http: httpx.AsyncClient, args: argparse.Namespace, probe: NeedleProbe, method: str) -> dict:
    """Stream one completion; its time to first text, total time, answer and statistics, or its error."""
    started = time.perf_counter()
    first_text, text, stats = None, "", {}
    try:
        async with http.stream(
            "POST", f"{args.url}/v1/chat/completions", json=request_body(args, probe, method), timeout=args.timeout
        ) as response:
            if response.status_code != 200:
                return {"method": method, "error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    return {"method": method, "error": chunk["error"]["message"]}
                delta = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if delta and first_text is None:
                    first_text = time.perf_counter() - started
                text += delta or ""
                stats = chunk.get("promptdistill", stats)
    except httpx.HTTPError as error:
        return {"method": method, "error": f"{type(error).__name__}: {error}"}
    return {
        "method": method,
        "error": None,
        "ttft_seconds": first_text,
        "seconds": time.perf_counter() - started,
        "answered": probe.is_answered(text),
        "text": text,
        "depth": probe.depth,
        **{k: stats.get(k) for k in ("prompt_tokens", "kept_tokens", "prefill_seconds")},
    }


async def run_level(args: argparse.Namespace, probes: list[NeedleProbe], method: str, concurrency: int) -> dict:
    """Every probe through the server, `concurrency` at a time; the level's summary with its records."""
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency)

    async with httpx.AsyncClient(headers=headers, limits=limits) as http:

        async def gated(probe: NeedleProbe) -> dict:
            async with gate:
                return await one_request(http, args, probe, method)

        started = time.perf_counter()
        records = await asyncio.gather(*(gated(probe) for probe in probes))
        wall = time.perf_counter() - started
    done = [r for r in records if r["error"] is None]
    ttfts = sorted(r["ttft_seconds"] for r in done if r["ttft_seconds"] is not None)
    return {
        "method": method,
        "concurrency": concurrency,
        "requests": len(records),
        "seconds": wall,
        "requests_per_second": len(done) / wall,
        "ttft_p50": _percentile(ttfts, 0.50),
        "ttft_p95": _percentile(ttfts, 0.95),
        "errors": len(records) - len(done),
        "answered": sum(r["answered"] for r in done),
        "prompt_tokens": _mean(r["prompt_tokens"] for r in done),
        "kept_tokens": _mean(r["kept_tokens"] for r in done),
        "records": records,
    }


def _percentile(sorted_values: list[float], share: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, round(share * len(sorted_values) + 0.5) - 1))]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def server_rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def table(levels: list[dict]) -> str:
    lines = [
        "| concurrency | method | kept / prompt | requests/s | TTFT p50 s | TTFT p95 s | errors | answered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        kept = f"{level['kept_tokens']:.0f} / {level['prompt_tokens']:.0f}" if level["prompt_tokens"] else "–"
        lines.append(
            f"| {level['concurrency']} | {level['method']} | {kept} | {level['requests_per_second']:.3f} | "
            f"{_seconds(level['ttft_p50'])} | {_seconds(level['ttft_p95'])} | {level['errors']} | "
            f"{level['answered']}/{level['requests']} |"
        )
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


async def run(args: argparse.Namespace) -> dict:
    probes = make_probes(load_tokenizer(args.tokenizer), args.requests, args.tokens)
    rss_before = server_rss_mib(args.server_pid)
    levels = []
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        for method in METHODS:  # both methods at each level, so machine load drifts equally on both
            levels.append(await run_level(args, probes, method, concurrency))
            print(table(levels[-1:]).splitlines()[-1], flush=True)
    return {
        "url": args.url,
        "model": args.model,
        "context_tokens": args.tokens,
        "max_tokens": args.max_tokens,
        "server_rss_mib_before": rss_before,
        "server_rss_mib_after": server_rss_mib(args.server_pid),
        "levels": levels,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    print()
    print(table(report["levels"]))
    if args.server_pid is not None:
        print(
            f"\nserver RSS: {report['server_rss_mib_before']:.0f} MiB before, "
            f"{report['server_rss_mib_after']:.0f} MiB after"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
