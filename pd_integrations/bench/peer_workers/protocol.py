"""The JSON protocol between `pd-bench peers` and a peer worker, which runs in the peer engine's own virtualenv.

The worker runs as `PYTHON WORKER.py REQUEST.json RESULT.json`. The request holds `model` (a directory or a GGUF
file), `prompts` (token id lists, shortest first), `decode_tokens`, `context` (the context window to allocate)
and engine settings (`dtype`, `threads`). The result holds the engine's `version`, the `settings` it ran with
and `runs`: per prompt (and thread count) its index `prompt`, `prompt_tokens`, `ttft_seconds` (call to first token,
wall clock), `decode_tokens_per_second` (after the first token; null for `decode_tokens` 1) and `output_tokens`.
A worker whose engine does not import writes `{"missing": "<the import error>"}` and exits with `MISSING`.
Standard library only: the peer's virtualenv has no pd-integrations.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

MISSING = 3


def serve(module: str, measure: Callable[[object, dict], dict]) -> None:
    """Import the engine's `module`, run `measure(module, request)` on the request named on the command line and
    write what it returns as the result."""
    request_path, result_path = sys.argv[1:3]
    request = json.loads(Path(request_path).read_text())
    try:
        engine = importlib.import_module(module)
    except ImportError as error:
        Path(result_path).write_text(json.dumps({"missing": str(error)}))
        sys.exit(MISSING)
    Path(result_path).write_text(json.dumps(measure(engine, request)))


def decode_rate(tokens: int, seconds: float) -> float | None:
    """Tokens per second after the first token (which comes with the prefill); None without a second token."""
    return (tokens - 1) / seconds if tokens > 1 and seconds > 0 else None
