"""The scheduler every generation on a runtime goes through, so that concurrent calls share forwards.

Each round admits waiting requests, prefills them together and advances one decode batch by a token; see
docs/batching.md. Who runs the rounds is `SchedulerSettings.driver`: by default a call waiting for its tokens runs
them in its own thread; pd-serve, whose requests are stepped in changing threads, uses one worker thread per
runtime. On CPU, the thread that ran a round gives its OpenMP team back (`release_openmp_threads`), so whichever
thread runs the next one owns the only team: with two teams on a machine with no spare cores, libgomp's workers
sleep between parallel regions, and a decode step ran twice as slow.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from .config import PromptDistillConfig
from .cpu_kernels import release_openmp_threads
from .decode import DecodeBatch
from .layout import PromptLayout
from .methods import method_for
from .runtime import Runtime
from .sampling import Sampler


@dataclass(frozen=True)
class SchedulerSettings:
    """How the scheduler batches and what it refuses. At most `max_batch_size` sequences decode together; one prefill
    step takes at most `max_batch_tokens` tokens, padding included (a longer prompt still runs, alone); an idle
    scheduler waits `batch_wait` seconds for company before prefilling. `driver` is "caller" (a call runs the rounds
    in its own thread while it waits, one thread at a time) or "thread" (a worker thread per runtime runs them).

    Limits (None: none): a prompt (with its query suffix) over `max_prompt_tokens` is refused; `max_kv_bytes` bounds the
    KV cache of all running sequences, each counted as if nothing were pruned (prompt and `max_new_tokens` in every
    layer), so admission is safe whatever selection keeps: a request that alone exceeds it is refused, others
    wait for room. Refusals are `ValueError`s raised to the caller before any model work.
    """

    max_batch_size: int = 16
    max_batch_tokens: int = 16384
    batch_wait: float = 0.005
    max_prompt_tokens: int | None = None
    max_kv_bytes: int | None = None
    driver: str = "caller"

    def __post_init__(self):
        for name in ("max_batch_size", "max_batch_tokens", "max_prompt_tokens", "max_kv_bytes"):
            value = getattr(self, name)
            if value is None and name.startswith(("max_prompt", "max_kv")):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                kind = "an int >= 1" if name.startswith("max_batch") else "None or an int >= 1"
                raise ValueError(f"{name} must be {kind}, got {value!r}")
        if (
            isinstance(self.batch_wait, bool)
            or not isinstance(self.batch_wait, (int, float))
            or not (0 <= self.batch_wait <= 1)
        ):
            raise ValueError(f"batch_wait must be a number of seconds in [0, 1], got {self.batch_wait!r}")
        if self.driver not in DRIVERS:
            raise ValueError(f"driver must be one of {', '.join(map(repr, DRIVERS))}, got {self.driver!r}")


@dataclass(eq=False)
class Request:
    """One generation: its prefill input (prompt then probe ids, and their layout), its config and sampler, and
    the queue its events go to, each `(kind, tag, payload)`: ("prefill", tag, (PrefillSequence, seconds)),
    ("token", tag, id), ("end", tag, finish reason) or ("error", tag, exception). `tag` tells the prompts of one call
    apart."""

    ids: torch.Tensor
    layout: PromptLayout
    config: PromptDistillConfig
    sampler: Sampler
    max_new_tokens: int
    events: queue.SimpleQueue
    sequence: torch.Tensor  # prompt and output ids [1, t], for the stopping criteria
    tag: int = 0
    generated: int = 0
    position: int = 0  # where the last sampled token will be fed
    cancelled: bool = False

    @property
    def tokens_bound(self) -> int:
        """The most tokens its cache can hold in any layer: prompt, probe and every new token."""
        return self.ids.shape[0] + self.max_new_tokens


@dataclass(eq=False)
class Scheduler:
    """The runtime's request queue, decode batch and driver (see the module docstring). `sequences_per_forward`
    counts forwards by (kind, sequences in the forward), kind "prefill" or "decode": what batching did;
    `forward_seconds` sums their time by kind."""

    runtime: Runtime
    settings: SchedulerSettings = field(default_factory=SchedulerSettings)
    sequences_per_forward: Counter = field(default_factory=Counter)
    forward_seconds: Counter = field(default_factory=Counter)
    _waiting: deque = field(default_factory=deque)
    _running: list = field(default_factory=list)
    _batch: DecodeBatch | None = None
    _worker: threading.Thread | None = None
    _wake: threading.Condition = field(default_factory=threading.Condition)
    _driving: threading.Lock = field(default_factory=threading.Lock)  # held by the thread running a round
    _stopping: bool = False

    @classmethod
    def of(cls, runtime: Runtime) -> Scheduler:
        """The runtime's scheduler, created on first use."""
        with _creating:
            if runtime.scheduler is None:
                runtime.scheduler = cls(runtime)
                if runtime.arch.attn_implementation.startswith("flash"):
                    # Flash kernels take no dense mask, so padded sequences cannot share a forward.
                    runtime.scheduler.settings = SchedulerSettings(max_batch_size=1)
            return runtime.scheduler

    def check(self, request: Request) -> None:
        """Raise `ValueError` if the limits in `settings` refuse `request` (see `SchedulerSettings`)."""
        settings, tokens = self.settings, request.ids.shape[0]
        if settings.max_prompt_tokens is not None and tokens > settings.max_prompt_tokens:
            raise ValueError(
                f"the prompt has {tokens} tokens (including the query, appended to score selection), over "
                f"max_prompt_tokens={settings.max_prompt_tokens} (see configure_scheduler)"
            )
        needed = request.tokens_bound * self._kv_bytes_per_token
        if settings.max_kv_bytes is not None and needed > settings.max_kv_bytes:
            raise ValueError(
                f"this request may need {needed} bytes of KV cache ({tokens} prompt tokens and max_new_tokens="
                f"{request.max_new_tokens}, unpruned), over max_kv_bytes={settings.max_kv_bytes} (see "
                f"configure_scheduler); lower max_new_tokens or retrieve less"
            )

    @property
    def _kv_bytes_per_token(self) -> int:
        """Bytes one token's keys and values take across all layers."""
        layer = self.runtime.arch.layers[0].self_attn
        config = self.runtime.arch.config
        element = self.runtime.model.dtype.itemsize
        return 2 * config.num_key_value_heads * layer.head_dim * element * self.runtime.arch.num_layers

    def submit(self, requests: list[Request]) -> None:
        """Queue `requests` (admitted together when limits allow); with the "thread" driver, make sure the worker
        runs."""
        self._release_openmp_threads()  # preparing them may have started a team in this thread
        with self._wake:
            if self._stopping:
                raise RuntimeError("the scheduler has stopped: the interpreter is exiting")
            self._waiting.extend(requests)
            if self.settings.driver == "thread" and self._worker is None:
                self._worker = threading.Thread(target=self._work, name="pd-scheduler", daemon=True)
                self._worker.start()
                _live.add(self)
            self._wake.notify()

    def next_event(self, events: queue.SimpleQueue) -> tuple:
        """The next event on `events` (one call's queue). With the "caller" driver, this thread runs rounds while
        none is there and no other thread is running one."""
        while True:
            try:
                return events.get_nowait()
            except queue.Empty:
                pass
            if self._worker is None and self._driving.acquire(blocking=False):
                try:
                    self._round()
                finally:
                    self._driving.release()
                continue
            try:  # another thread runs the rounds; look again soon, in case it leaves
                return events.get(timeout=HANDOFF_SECONDS)
            except queue.Empty:
                pass

    def cancel(self, requests: list[Request]) -> None:
        """Stop `requests` (their caller has left; finished ones are unaffected) and, unless a round is running,
        let their sequences go now rather than at some later round."""
        for request in requests:
            request.cancelled = True
        if self._driving.acquire(blocking=False):
            try:
                with self._wake:
                    self._waiting = deque(r for r in self._waiting if not r.cancelled)
                self._drop_cancelled()
            finally:
                self._driving.release()
        self._release_openmp_threads()  # a call ends with this: whatever it ran in this thread is done

    def stop(self) -> None:
        """Cancel every request, telling its caller so (a caller that runs the rounds would otherwise wait for
        tokens that never come), and let the worker exit (at the next step boundary)."""
        stopped = RuntimeError("the scheduler has stopped: the interpreter is exiting")
        with self._wake:
            self._stopping = True
            for request in [*self._waiting, *self._running]:
                request.cancelled = True
                request.events.put(("error", request.tag, stopped))
            worker = self._worker
            self._wake.notify()
        if worker is not None:
            worker.join(timeout=30)

    def is_idle(self) -> bool:
        """No request waits or decodes, no round runs and no worker is left."""
        with self._wake:
            return self._worker is None and not self._waiting and not self._running and not self._driving.locked()

    # ---------------------------------------------------------------- the worker

    def _work(self) -> None:
        """The "thread" driver's loop: rounds while there is work, exiting after `IDLE_EXIT_SECONDS` without."""
        while True:
            with self._wake:
                if not self._running and not self._waiting and not self._stopping:
                    # Stay a moment for the next call: a thread per burst of calls would leave glibc a fresh
                    # arena each time, and resident memory creeping up.
                    self._wake.wait(IDLE_EXIT_SECONDS)
                if not self._running and not self._waiting or self._stopping:
                    self._worker = None
                    return
            with self._driving:
                self._round()

    def _round(self) -> None:
        """Admit what fits, prefill it, and advance the decode batch by one token per sequence."""
        with self._wake:
            if not self._running and self._waiting and self.settings.batch_wait:
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
        finally:
            self._release_openmp_threads()

    def _release_openmp_threads(self) -> None:
        """On CPU, give this thread's OpenMP team back: the next round may run in another thread (module docstring)."""
        if self.runtime.device.type == "cpu":
            release_openmp_threads()

    def _linger(self, seconds: float) -> None:
        """Wait `seconds` (holding no forward) so that requests arriving together are admitted together."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._wake.wait(left)

    def _admit(self) -> list[Request]:
        """Waiting requests that fit the decode batch and one prefill step, first come first served."""
        admitted, width, settings = [], 0, self.settings
        kv_tokens = sum(r.tokens_bound for r in self._running)
        kv_limit = None if settings.max_kv_bytes is None else settings.max_kv_bytes // self._kv_bytes_per_token
        while self._waiting and len(self._running) + len(admitted) < settings.max_batch_size:
            request = self._waiting[0]
            if request.cancelled:
                self._waiting.popleft()
                continue
            wider = max(width, request.ids.shape[0])
            if admitted and wider * (len(admitted) + 1) > settings.max_batch_tokens:
                break
            kv_tokens += request.tokens_bound
            if kv_limit is not None and kv_tokens > kv_limit and (admitted or self._running):
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
        self.sequences_per_forward["prefill", len(group)] += 1
        self.forward_seconds["prefill"] += seconds
        for request, prefilled in zip(group, prefill.sequences):
            request.events.put(("prefill", request.tag, (prefilled, seconds)))
            request.position = prefilled.next_position
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
        self.sequences_per_forward["decode", len(running)] += 1
        for request in running:
            request.position += 1
        self._keep_running(self._sample(running, logits))

    def _drop_cancelled(self) -> None:
        """Let sequences whose callers left leave the decode batch."""
        self._keep_running([i for i, r in enumerate(self._running) if not r.cancelled])

    def _keep_running(self, indices: list[int]) -> None:
        """Keep only the running sequences at `indices` in the decode batch."""
        if len(indices) == len(self._running):
            return
        self._running = [self._running[i] for i in indices]
        if indices:
            self._batch.keep(indices)
        else:
            self._batch = None

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        """Choose each sequence's next token from `logits` [B, vocab] and emit it; returns the indices of the
        sequences that go on."""
        continuing, max_positions = [], self.runtime.arch.max_positions
        for i, (request, next_logits) in enumerate(zip(requests, logits)):
            if request.cancelled:
                continue
            with torch.inference_mode():  # the logits are inference tensors; constraints mask them in place
                request.sequence, stopped = request.sampler.next_token(request.sequence, next_logits)
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


DRIVERS = ("caller", "thread")
_creating = threading.Lock()
# A call waiting while another thread runs the rounds looks this often whether that thread has left.
HANDOFF_SECONDS = 0.005
# An idle worker waits this long for the next request before it exits.
IDLE_EXIT_SECONDS = 1.0
_live: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _stop_workers() -> None:
    # Workers are daemons (an idle one must not hold up the interpreter's exit), so stop them before it tears
    # down: a daemon thread frozen inside a torch kernel then aborts the process.
    for scheduler in list(_live):
        scheduler.stop()
