"""What the `pd-bench` commands share: argument types, the speed runs' needle depth, and writing a run's results."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
import transformers

from ..engine import PromptDistillEngine
from . import measure

SPEED_DEPTH = 0.5  # the speed runs hide a needle too, so that their answers can be checked


def lengths(text: str) -> list[int]:
    """Comma-separated token counts (`1k` = 1024); raises `argparse.ArgumentTypeError` for others."""
    try:
        lengths = [int(float(v[:-1]) * 1024) if v.lower().endswith("k") else int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token counts such as 1k,2k,4096, got {text!r}"
        ) from None
    if any(n < 1 for n in lengths):
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return lengths


def counts(text: str) -> list[int]:
    """Comma-separated positive integers; raises `argparse.ArgumentTypeError` for others."""
    return [positive(v) for v in text.split(",")]


def depths(text: str) -> list[float]:
    """Comma-separated depths in [0, 1]; raises `argparse.ArgumentTypeError` for others."""
    try:
        depths = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated depths in [0, 1], got {text!r}") from None
    if not all(0 <= d <= 1 for d in depths):
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got {text!r}")
    return depths


def positive(text: str) -> int:
    """A positive integer; raises `argparse.ArgumentTypeError` for anything else."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def budget(text: str) -> int | float:
    """A token count >= 1 or a fraction in (0, 1]; raises `argparse.ArgumentTypeError` for anything else."""
    if text.isdigit() and int(text) >= 1:
        return int(text)
    try:
        fraction = float(text)
    except ValueError:
        fraction = 0.0
    if not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"expected a token count >= 1 or a fraction in (0, 1], got {text!r}")
    return fraction


def names(allowed: tuple[str, ...]):
    """An argument type: comma-separated names among `allowed`, at least one."""

    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}, got {text!r}")
        return names

    return parse


def write(out: Path, name: str, command_line: str, engine, methods: dict, table: str, note: str, **data) -> list[Path]:
    """Print the table and write OUT/<name>.md and OUT/<name>.json (the command, environment, methods and
    `data`); returns their paths."""
    text = "\n\n".join([f"`{command_line}`", table, note, _method_notes(methods)])
    print(f"\n{text}\n")
    files = [out / f"{name}.md", out / f"{name}.json"]
    files[0].write_text(text + "\n")
    files[1].write_text(
        json.dumps(
            {
                "command": command_line,
                "environment": _environment(engine),
                "peak_memory": measure.PEAK_MEMORY,
                "methods": methods,
                **data,
            },
            indent=1,
        )
        + "\n"
    )
    return files


def _method_notes(methods: dict[str, dict]) -> str:
    lines = []
    for name, method in methods.items():
        config = method["config"]
        settings = (
            ""
            if not config["selection_layers"]
            else (
                f" (layers {config['selection_layers']}, budgets {config['budgets']}, {config['query_source']} seeds, "
                f"{config['aggregation']}, pool {config['pool_kernel']}, {config['span']} spans"
                + (f", chunk_size {config['chunk_size']}" if config["span"] == "chunk" else "")
                + (f", heads {config['heads']}" if config.get("heads") and any(config["heads"]) else "")
                + (f", {config['unit_score']} units" if config["span"] != "token" and config.get("unit_score") else "")
                + (f", detrended over {config['detrend_window']}" if config.get("detrend_window") else "")
                + (f", last {config['protect_recent']} context tokens kept" if config.get("protect_recent") else "")
                + (", line and sentence ends kept" if config.get("protect_structure") else "")
                + ")"
            )
        )
        shared = f"; same config as {method['measured_as']}, measured once" if method["measured_as"] != name else ""
        lines.append(f"- {name}: {method['description']}{settings}{shared}")
    return "\n".join(lines)


def _environment(engine: PromptDistillEngine) -> dict:
    return {
        "model": engine.model_name,
        "device": str(engine.device),
        "dtype": str(engine.model.dtype),
        "attn_implementation": engine.arch.attn_implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
