"""The compared methods, and running benchmark prompts through them.

Peak memory is the most a call (prefill + decode) holds on top of what the process held just before it:
- CUDA: `torch.cuda.max_memory_allocated` after resetting the peak statistics, minus the memory allocated before.
- CPU on Linux: the process's peak resident set size (`VmHWM`) after resetting it to the current RSS through
  `/proc/self/clear_refs`, minus the RSS before. Freed heap memory is first returned to the system
  (`malloc_trim`), so that memory a previous call freed is not silently reused and left out. A call after a trim
  faults its memory in again, which a user's calls do not (`keep_freed_memory`), so a timed call never follows a
  trim: the memory of a cell (method, length, shape or task) is measured once, on its first prompt, in an extra
  untimed run, and every record of the cell carries it.
- Elsewhere (macOS, Windows): not measured (`None`), because the process peak never goes down.
"""

from __future__ import annotations

import ctypes
import json
import re
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..calibration.cost import predicted_ratio_of
from ..config import PAPER_SCORING, PromptDistillConfig
from ..engine import PromptDistillEngine
from ..probes import needles_kept
from .tasks import Probe, needle

PEAK_MEMORY = (
    "bytes a call held at its peak beyond what the process held just before it: on CUDA "
    "max_memory_allocated after a reset; on Linux CPUs the peak RSS (VmHWM, reset through "
    "/proc/self/clear_refs after malloc_trim) minus the RSS before, measured once per cell (method, length, "
    "shape or task) in an extra untimed run of its first prompt; null elsewhere"
)
METHODS = ("full", "gemfilter", "random", "paper-rule", "single-stage", "profile")
DESCRIPTIONS = {
    "full": "full attention, the unmodified model",
    "gemfilter": "GemFilter: select at the layer, then re-run the whole model on the kept tokens",
    "random": "the profile's schedule and budgets keeping uniformly random context tokens: the floor to beat",
    "paper-rule": "PromptDistill with the paper's scoring (last token, logit mean, pool 5, tokens)",
    "single-stage": "PromptDistill with the profile's scoring, one selection at the layer",
    "profile": "PromptDistill with the model's profile (the engine's default settings)",
}


def method_engines(
    engine: PromptDistillEngine, names: list[str], layer: int | None, budget: int | float | None
) -> dict[str, PromptDistillEngine]:
    """An engine per method name, sharing `engine`'s weights; `engine.config` is the profile.

    gemfilter, paper-rule and single-stage select once, at `layer` keeping `budget` tokens (default: the profile's
    first stage). Raises `ValueError` for an unknown name or a layer that doesn't fit the model.
    """
    unknown = set(names) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    profile = engine.config
    layer = profile.selection_layers[0] if layer is None else layer
    budget = profile.budgets[0] if budget is None else budget
    stage = {"selection_layers": (layer,), "budgets": (budget,)}
    # A profile's calibrated heads belong to its own first layer; elsewhere every head scores.
    first_heads = (profile.heads[0] if layer == profile.selection_layers[0] else None,)
    configs = {
        "full": PromptDistillConfig(method="full"),
        "gemfilter": PromptDistillConfig(method="gemfilter", **stage, heads=(None,)),
        "random": profile.replace(method="random"),
        "paper-rule": PromptDistillConfig(**stage, **PAPER_SCORING, heads=(None,)),
        "single-stage": profile.replace(**stage, heads=first_heads),
        "profile": profile,
    }
    return {name: engine.with_config(configs[name]) for name in names}


def describe(engines: dict[str, PromptDistillEngine]) -> dict[str, dict]:
    """Per method: what it is, its resolved config, and which method's runs it shares when the configs are equal."""
    described, first_by_config = {}, {}
    for name, engine in engines.items():
        measured_as = first_by_config.setdefault(engine.config, name)
        described[name] = {
            "description": DESCRIPTIONS[name],
            "config": asdict(engine.config),
            "measured_as": measured_as,
        }
    return described


def run(
    engines: dict[str, PromptDistillEngine],
    probes: list,
    *,
    desc: str,
    log: Path | None = None,
    measure_one: Callable | None = None,
    labels: dict | None = None,
) -> list[dict]:
    """Generate every probe with every method (probe-major, so load drifts hit all methods alike) and return one
    record per (probe, method): the probe's labels, `labels`, and what `measure_one(engine, probe)`
    measured (default: a `Probe` run through `generate`). Methods with equal configs run once and share the
    record. Each record is also appended to `log` (JSON lines) as soon as it exists, so an interrupted long run
    keeps what it measured."""
    measure_one = measure_one or _measure
    _CELL_PEAKS.clear()
    _warm_up(engines)
    distinct = len({engine.config for engine in engines.values()})
    records = []
    with tqdm(total=len(probes) * distinct, desc=desc, unit="run", file=sys.stderr) as bar:
        for probe in probes:
            by_config: dict[PromptDistillConfig, dict] = {}
            for name, engine in engines.items():
                if engine.config not in by_config:
                    bar.set_postfix_str(f"{name} at {probe.labels['length']} tokens")
                    by_config[engine.config] = measure_one(engine, probe)
                    bar.update()
                records.append({**probe.labels, **(labels or {}), "method": name, **by_config[engine.config]})
                if log is not None:
                    with log.open("a") as file:
                        file.write(json.dumps(records[-1]) + "\n")
    return records


def _measure(engine: PromptDistillEngine, probe: Probe) -> dict:
    result, peak = cell_peak_memory(
        engine,
        probe.labels,
        lambda: engine.generate(
            messages=probe.messages,
            query=probe.question,
            documents=[probe.context],
            max_new_tokens=probe.max_new_tokens,
        ),
    )
    return {
        **timing_record(engine, result, peak),
        "score": probe.score(result.text),
        "needles_kept": needles_kept(result.prompt_text, result.kept_char_spans, probe.needles),
    }


def timing_record(engine: PromptDistillEngine, result, peak_memory_bytes: int | None) -> dict:
    """What every benchmark records of `engine`'s `GenerationResult`: sizes, timings, memory, the output, and the
    cost model's prefill ratio for the engine's schedule on this prompt (None for full attention and for prompts
    left unpruned as query-free)."""
    predicted = (
        None
        if result.query_free
        else predicted_ratio_of(engine.config, engine.arch.num_layers, result.prompt_tokens, result.protected_tokens)
    )
    return {
        "prompt_tokens": result.prompt_tokens,
        "protected_tokens": result.protected_tokens,
        "kept_tokens": result.kept_tokens,
        "prefill_seconds": result.prefill_seconds,
        "predicted_prefill_ratio": predicted,
        # A rate needs at least two tokens: the first comes from prefill.
        "decode_tokens_per_second": result.decode_tokens_per_second if result.output_tokens > 1 else None,
        "kv_cache_bytes": result.kv_cache_bytes,
        "peak_memory_bytes": peak_memory_bytes,
        "output": result.text,
    }


def _warm_up(engines: dict[str, PromptDistillEngine]) -> None:
    """One short generation per distinct config, so one-off costs (kernel selection, thread pools, lazy
    allocations) stay out of the first measurement."""
    engine = next(iter(engines.values()))
    probe = needle(engine.tokenizer, 128, 0.5, seed=0)
    for distinct in {e.config: e for e in engines.values()}.values():
        distinct.generate(messages=probe.messages, query=probe.question, documents=[probe.context], max_new_tokens=2)


_CELL_PEAKS: dict[tuple, int | None] = {}  # per `run`: a cell's peak memory on CPU


def cell_peak_memory(engine: PromptDistillEngine, labels: dict, call):
    """(`call()`, its cell's peak memory in bytes or None), where the cell is `engine`'s config with the `labels`'
    length, shape and task. On CUDA the call's own peak; on CPU its cell's, measured before the first call of the
    cell in an extra run after a trim (see the module docstring), so that the returned call's timing is a warm one."""
    device = engine.device
    if device.type == "cuda":
        return _with_peak_memory(device, call)
    cell = (engine.config, labels.get("length"), labels.get("shape"), labels.get("task"))
    if cell not in _CELL_PEAKS:
        _CELL_PEAKS[cell] = _with_peak_memory(device, call)[1]
    return call(), _CELL_PEAKS[cell]


def _with_peak_memory(device: torch.device, call):
    """(`call()`, the bytes of memory it held at its peak beyond what was held before it, or None)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        value = call()
        return value, torch.cuda.max_memory_allocated(device) - before
    if not _reset_peak_rss():
        return call(), None
    before = _proc_status_kib("VmRSS")
    value = call()
    return value, (_proc_status_kib("VmHWM") - before) * 1024


def _reset_peak_rss() -> bool:
    """Return freed heap memory to the system and reset the process's peak RSS to its current RSS (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        return False
    return True


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))
