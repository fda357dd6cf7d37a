"""The scheduler every generation on a runtime goes through, so that concurrent calls share forwards.

Callers (`engine.generate`/`stream`/`generate_batch`, the adapters, the server, from any thread) submit requests;
one worker thread per runtime runs the loop a serving engine runs:

1. admit waiting requests while the decode batch has room (`max_batch_size`) and their padded prefill stays
   within `max_batch_tokens`; when nothing is decoding, first wait `batch_wait` seconds so that requests arriving
   together share one prefill;
2. prefill the admitted requests, one batched prefill per config (rows of different lengths, each selecting on
   its own), sample each row's first token, and join the rows to the running decode batch;
3. run one decode step for every running row, sample, emit, and let finished or abandoned rows leave.

Events go back to each caller through its request's queue; text, stop strings and results are the caller's work.
The worker holds the runtime's lock for each forward only, exits when idle, and never dies with a request: an
exception fails exactly the requests of the forward that raised it.

transformers has continuous batching too (`transformers.generation.continuous_batching`: a FIFO scheduler over a
paged KV cache, fed by the model's own forward). It does not fit a pruned prefill: its scheduler plans chunked
prefills of whole prompts through the model's forward, while ours changes the row set between layers; its paged
cache allocates the same blocks per request in every layer, while a pruned row holds n keys in the layers before
a selection and k after it; and its attention indexes positions by cache offset, while kept keys carry their
original, gapped positions. The loop and admission rules here follow its FIFO scheduler.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from .config import PromptDistillConfig
from .decode import DecodeBatch
from .layout import RowLayout
from .methods import method_for
from .runtime import Runtime
from .sampling import Sampler


@dataclass(frozen=True)
class BatchSettings:
    """How the scheduler batches: at most `max_batch_size` rows decode together; one prefill step takes at most
    `max_batch_tokens` tokens, padding included (a longer prompt still runs, alone); an idle scheduler waits
    `batch_wait` seconds for company before prefilling."""

    max_batch_size: int = 16
    max_batch_tokens: int = 16384
    batch_wait: float = 0.005

    def __post_init__(self):
        for name in ("max_batch_size", "max_batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.batch_wait, bool) or not isinstance(self.batch_wait, (int, float)) or not (
                0 <= self.batch_wait <= 1):
            raise ValueError(f"batch_wait must be a number of seconds in [0, 1], got {self.batch_wait!r}")


@dataclass(eq=False)
class Request:
    """One generation: its prefill input (prompt then probe ids, and the row layout), its config and sampler, and
    the queue its events go to, each `(kind, tag, payload)`: ("prefill", tag, (PrefillRow, seconds)), ("token",
    tag, id), ("end", tag, finish reason) or ("error", tag, exception). `tag` tells rows of one call apart."""

    ids: torch.Tensor
    layout: RowLayout
    config: PromptDistillConfig
    sampler: Sampler
    max_new_tokens: int
    events: queue.SimpleQueue
    sequence: torch.Tensor  # prompt and output ids [1, t], for the stopping criteria
    tag: int = 0
    generated: int = 0
    position: int = 0  # where the last sampled token will be fed
    cancelled: bool = False


@dataclass(eq=False)
class Scheduler:
    """The runtime's request queue, decode batch and worker (see the module docstring). `rows_per_forward`
    counts forwards by (kind, rows), kind "prefill" or "decode": what batching did; `forward_seconds` sums their
    time by kind."""

    runtime: Runtime
    settings: BatchSettings = field(default_factory=BatchSettings)
    rows_per_forward: Counter = field(default_factory=Counter)
    forward_seconds: Counter = field(default_factory=Counter)
    _waiting: deque = field(default_factory=deque)
    _running: list = field(default_factory=list)
    _batch: DecodeBatch | None = None
    _worker: threading.Thread | None = None
    _wake: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def of(cls, runtime: Runtime) -> Scheduler:
        """The runtime's scheduler, created on first use."""
        with _creating:
            if runtime.scheduler is None:
                runtime.scheduler = cls(runtime)
                if runtime.arch.attn_implementation.startswith("flash"):
                    # Flash kernels take no dense mask, so padded rows cannot share a forward.
                    runtime.scheduler.settings = BatchSettings(max_batch_size=1)
            return runtime.scheduler

    def submit(self, requests: list[Request]) -> None:
        """Queue `requests` (admitted together when limits allow) and make sure the worker runs."""
        with self._wake:
            self._waiting.extend(requests)
            if self._worker is None:
                # Not a daemon: one killed inside a torch kernel at interpreter exit aborts the process.
                self._worker = threading.Thread(target=self._work, name="pd-scheduler")
                self._worker.start()
            self._wake.notify()

    @staticmethod
    def cancel(request: Request) -> None:
        """Stop `request` at the next step boundary (its caller has left); a finished request is unaffected."""
        request.cancelled = True

    def is_idle(self) -> bool:
        """No request waits or decodes and the worker has exited."""
        with self._wake:
            return self._worker is None

    # ---------------------------------------------------------------- the worker

    def _work(self) -> None:
        while True:
            with self._wake:
                if not self._running and not self._waiting:
                    self._batch, self._worker = None, None
                    return
                if not self._running and self.settings.batch_wait:
                    self._linger(self.settings.batch_wait)
                admitted = self._admit()
            try:
                self._drop_cancelled()
                for group in _by_config(admitted):
                    self._prefill(group)
                if self._running:
                    self._decode()
            except Exception as error:  # noqa: BLE001 - a bug in the bookkeeping: fail its requests, keep serving
                for request in self._running + admitted:
                    request.events.put(("error", request.tag, error))
                self._running, self._batch = [], None

    def _linger(self, seconds: float) -> None:
        """Wait `seconds` (holding no forward) so that requests arriving together are admitted together."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._wake.wait(left)

    def _admit(self) -> list[Request]:
        """Waiting requests that fit the decode batch and one prefill step, first come first served."""
        admitted, width = [], 0
        while self._waiting and len(self._running) + len(admitted) < self.settings.max_batch_size:
            request = self._waiting[0]
            if request.cancelled:
                self._waiting.popleft()
                continue
            wider = max(width, request.ids.shape[0])
            if admitted and wider * (len(admitted) + 1) > self.settings.max_batch_tokens:
                break
            admitted.append(self._waiting.popleft())
            width = wider
        return admitted

    def _prefill(self, group: list[Request]) -> None:
        runtime = self.runtime
        try:
            method = method_for(group[0].config, [r.layout for r in group])
            started = time.perf_counter()
            with runtime.lock, torch.inference_mode():
                prefill = method.prefill(runtime, [r.ids for r in group], [r.layout for r in group])
                if runtime.device.type == "cuda":
                    torch.cuda.synchronize(runtime.device)
            seconds = time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 - it belongs to these requests' callers, not to the worker
            for request in group:
                request.events.put(("error", request.tag, error))
            return
        self.rows_per_forward["prefill", len(group)] += 1
        self.forward_seconds["prefill"] += seconds
        for request, row in zip(group, prefill.rows):
            request.events.put(("prefill", request.tag, (row, seconds)))
            request.position = row.next_position
        batch = DecodeBatch.after(runtime, prefill)
        continuing = self._sample(group, prefill.logits)
        if len(continuing) < len(group):
            batch.keep(continuing)
        if continuing:
            self._running += [group[i] for i in continuing]
            if self._batch is None:
                self._batch = batch
            else:
                self._batch.join(batch)

    def _decode(self) -> None:
        running = self._running
        try:
            tokens = torch.cat([r.sequence[0, -1:] for r in running])
            started = time.perf_counter()
            with self.runtime.lock, torch.inference_mode():
                logits = self._batch.step(tokens)
            self.forward_seconds["decode"] += time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 - it belongs to the running requests' callers
            for request in running:
                request.events.put(("error", request.tag, error))
            self._running, self._batch = [], None
            return
        self.rows_per_forward["decode", len(running)] += 1
        for request in running:
            request.position += 1
        self._keep_running(self._sample(running, logits))

    def _drop_cancelled(self) -> None:
        """Let rows whose callers left leave the decode batch."""
        self._keep_running([i for i, r in enumerate(self._running) if not r.cancelled])

    def _keep_running(self, rows: list[int]) -> None:
        """Keep only running rows `rows` in the decode batch."""
        if len(rows) == len(self._running):
            return
        self._running = [self._running[i] for i in rows]
        if rows:
            self._batch.keep(rows)
        else:
            self._batch = None

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        """Choose each row's next token from `logits` [B, vocab] and emit it; returns the rows that go on."""
        continuing, max_positions = [], self.runtime.arch.max_positions
        for i, (request, row_logits) in enumerate(zip(requests, logits)):
            if request.cancelled:
                continue
            with torch.inference_mode():  # the logits are inference tensors; constraints mask them in place
                request.sequence, stopped = request.sampler.next_token(request.sequence, row_logits)
            request.generated += 1
            request.events.put(("token", request.tag, int(request.sequence[0, -1])))
            if stopped:
                request.events.put(("end", request.tag, "stop"))
            elif request.generated >= request.max_new_tokens or request.position >= max_positions:
                request.events.put(("end", request.tag, "length"))
            else:
                continuing.append(i)
        return continuing


def _by_config(requests: list[Request]) -> list[list[Request]]:
    """`requests` grouped by config (one prefill each), in order of first arrival."""
    groups: dict[PromptDistillConfig, list[Request]] = {}
    for request in requests:
        groups.setdefault(request.config, []).append(request)
    return list(groups.values())


_creating = threading.Lock()
