"""The PromptDistill inference path, top to bottom: render → lay out tokens → scheduled prefill and decode → result.

- render (`prompt.py`): the prompt, chat messages or token ids as tokens with character offsets;
- lay out tokens (`layout.py`): which tokens are retrieved context (prunable), which tokens seed selection, the
  query suffix;
- prefill (`methods/`): full attention, PromptDistill or GemFilter over HF's own layers, a batch of sequences at
  once; at a selection layer each sequence keeps its own selected tokens (original order, original RoPE positions)
  and every protected token;
- decode (`decode.py`): the running batch, one token per sequence per step, each sequence at its own original
  position;
- schedule (`scheduler.py`): every generation is a request to the runtime's scheduler, so concurrent calls share
  prefills and decode steps without asking;
- result (here): the text, cut at stop strings and streamed as deltas, and what was kept.

An engine is a shared `Runtime` (weights, tokenizer, scheduler, lock) plus a resolved config; engines with other
configs over the same runtime batch together.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Generator

import torch

from .config import PromptDistillConfig, resolve_config
from .inputs import PromptInput, SamplingParams, batch_inputs, call_inputs, prompt_input
from .layout import PromptLayout, plan_layout
from .loading import DEFAULT_MODEL, load_model
from .methods import METHOD_CLASSES, Prefill, PrefillSequence, QueryAttentionRecorder, method_for
from .prompt import RenderedPrompt, kept_shares, render
from .results import BatchStream, GenerationResult, GenerationStream
from .runtime import Runtime
from .sampling import Sampler, TextDeltas
from .scheduler import Request, Scheduler, SchedulerSettings
from .selection import Selector

__all__ = [
    "BatchStream",
    "GenerationResult",
    "GenerationStream",
    "Prefill",
    "PromptDistillEngine",
    "PromptInput",
    "SamplingParams",
]

_RUNTIME_LOAD_SETTINGS = {"device", "dtype", "quantization"}


class PromptDistillEngine:
    """Runs prompts through a Hugging Face causal LM with PromptDistill selection during prefill.

    `config` fields left unset are filled from the model's profile (see `resolve_config`); `engine.config` is the
    resolved config. Raises `UnsupportedArchitectureError` for an unknown model family and `ValueError` for a
    config that doesn't fit the model.
    """

    def __init__(self, model, tokenizer, config: PromptDistillConfig | None = None, *, model_name: str | None = None):
        self._setup(Runtime.wrap(model, tokenizer, model_name), config)

    @classmethod
    def from_runtime(cls, runtime: Runtime, config: PromptDistillConfig | None = None) -> PromptDistillEngine:
        """An engine over a shared `runtime` with `config`."""
        engine = cls.__new__(cls)
        engine._setup(runtime, config)
        return engine

    @classmethod
    def from_pretrained(
        cls, model_name: str = DEFAULT_MODEL, config: PromptDistillConfig | None = None, **load_kwargs
    ) -> PromptDistillEngine:
        """An engine over `model_name`, loaded once per process and `device`/`dtype`/`quantization` settings
        (`Runtime.load`); other `load_model` arguments (`device_map`, `trust_remote_code`) load a private copy."""
        if set(load_kwargs) <= _RUNTIME_LOAD_SETTINGS:
            return cls.from_runtime(Runtime.load(model_name, **load_kwargs), config)
        return cls.from_runtime(Runtime.wrap(*load_model(model_name, **load_kwargs), model_name), config)

    def _setup(self, runtime: Runtime, config: PromptDistillConfig | None) -> None:
        arch = runtime.arch
        self.runtime = runtime
        self.config = resolve_config(
            config, lambda: runtime.profile, runtime.model_name, arch.num_layers, arch.num_heads
        )

    def with_config(self, config: PromptDistillConfig) -> PromptDistillEngine:
        """An engine sharing this one's runtime (weights, tokenizer, scheduler, lock, profile) with another
        config."""
        return PromptDistillEngine.from_runtime(self.runtime, config)

    model = property(lambda self: self.runtime.model)
    tokenizer = property(lambda self: self.runtime.tokenizer)
    arch = property(lambda self: self.runtime.arch)
    model_name = property(lambda self: self.runtime.model_name)
    device = property(lambda self: self.runtime.device)

    @property
    def scheduler(self) -> Scheduler:
        """The runtime's scheduler, shared by every engine over it."""
        return Scheduler.of(self.runtime)

    def configure_scheduler(self, **settings) -> SchedulerSettings:
        """Change how generations on this runtime batch, what they may use and which thread runs them: any
        `SchedulerSettings` field (`max_batch_size`, `max_batch_tokens`, `batch_wait`, `max_prompt_tokens`,
        `max_kv_bytes`, `driver`); every engine over the runtime shares them. Returns the new settings; raises
        `TypeError` for an unknown setting and `ValueError` naming a bad value."""
        known = {f.name for f in dataclasses.fields(SchedulerSettings)}
        if unknown := sorted(set(settings) - known):
            raise TypeError(f"unknown scheduler settings {unknown}; choose from {sorted(known)}")
        self.scheduler.settings = dataclasses.replace(self.scheduler.settings, **settings)
        return self.scheduler.settings

    # ---------------------------------------------------------------- public API

    def generate(
        self, prompt: str | PromptInput | None = None, *, sampling: SamplingParams | None = None, **arguments
    ) -> GenerationResult:
        """Generate a completion; takes the same arguments as `stream`. Returns a `GenerationResult`."""
        stream = self.stream(prompt, sampling=sampling, **arguments)
        for _ in stream:
            pass
        return stream.result

    def stream(
        self, prompt: str | PromptInput | None = None, *, sampling: SamplingParams | None = None, **arguments
    ) -> GenerationStream:
        """Generate one completion, as text deltas: `engine.stream("...", query=..., max_new_tokens=64)`.

        Args:
            prompt: the raw-text prompt, or a `PromptInput` (chat `messages`, `input_ids`, query, documents, tools).
            sampling: a `SamplingParams` (greedy, 256 tokens when omitted).
            **arguments: fields of either by name (`messages=`, `query=`, `documents=`, `temperature=`, `stop=`,
                `constraint=`, ...), replacing those of `prompt` and `sampling`; see `PromptInput` and
                `SamplingParams` for what each does.

        Returns a `GenerationStream` of text deltas (its `result` once exhausted). Raises `ValueError`/`TypeError`
        naming the parameter before any model work. Concurrent calls share forwards (see
        `pd_integrations.scheduler`).
        """
        prompt, sampling = call_inputs("stream", prompt, sampling, arguments)
        rendered, layout = self._prepare(prompt)
        request = self._request(rendered, layout, queue.SimpleQueue(), 0, sampling)
        return GenerationStream(_deltas(self._run([request], [rendered])))

    def generate_batch(
        self, prompts: list | None = None, *, sampling: SamplingParams | None = None, **arguments
    ) -> list[GenerationResult]:
        """Generate a completion per prompt; takes the same arguments as `stream_batch`. Returns one
        `GenerationResult` per prompt, in order."""
        stream = self.stream_batch(prompts, sampling=sampling, **arguments)
        for _ in stream:
            pass
        return stream.result

    def stream_batch(
        self, prompts: list | None = None, *, sampling: SamplingParams | None = None, **arguments
    ) -> BatchStream:
        """Generate for several prompts at once; they are prefilled and decoded together, each selecting and
        stopping on its own.

        Args:
            prompts: a list of raw-text prompts or of `PromptInput`s; or pass `messages=` or `input_ids=` lists.
            sampling: a `SamplingParams` every prompt shares (a `constraint` in it must be a `Grammar`, which gives
                each prompt its own matcher).
            **arguments: per-prompt lists `queries`, `documents`, `tools` and `constraints` (or None), the shared
                `tool_format`, and `SamplingParams` fields by name (see `stream`).

        Returns a `BatchStream` yielding `(i, text_delta)` for prompt i, whose `result` is the list of
        `GenerationResult`s in prompt order. Raises `ValueError`/`TypeError` naming the parameter and the prompt
        ("row i: ...") before any model work.
        """
        events, requests, rendered = queue.SimpleQueue(), [], []
        for i, (prompt, prompt_sampling) in enumerate(batch_inputs("stream_batch", prompts, sampling, arguments)):
            try:
                rendered.append(self._prepare(prompt))
                requests.append(self._request(*rendered[-1], events, i, prompt_sampling))
            except (ValueError, TypeError) as error:
                raise type(error)(f"row {i}: {error}") from error
        return BatchStream(self._run(requests, [r for r, _ in rendered]))

    def check(self, prompt: str | PromptInput | None = None, **arguments) -> None:
        """Raise the `ValueError`/`TypeError` that `generate` would raise for this input (bad arguments, documents
        not in the prompt, a prompt and query suffix beyond the context window) without running the model: a long job
        can check all its inputs before the first one runs. Takes `prompt` and `PromptInput` fields as `stream`
        does."""
        self._prepare(prompt_input("check", prompt, arguments))

    def prefill(self, prompt: str | PromptInput | None = None, **arguments) -> Prefill:
        """Run only the prefill of one prompt (a batch of one) and return its `Prefill` (cache, next-token
        logits [1, vocab], and its `PrefillSequence`: kept indices, layout). Takes `prompt` and `PromptInput` fields
        as `stream` does."""
        rendered, layout = self._prepare(prompt_input("prefill", prompt, arguments))
        method = method_for(self.config, [layout])
        with self.runtime.lock, torch.inference_mode():
            return method.prefill(self.runtime, [self._ids(rendered, layout)], [layout])

    def query_attention(
        self, prompt: str | PromptInput | None = None, **arguments
    ) -> tuple[RenderedPrompt, PromptLayout, torch.Tensor]:
        """Per-layer, per-head attention of the seeds to every prompt token in an unpruned pass (for calibration).
        Takes `prompt` and `PromptInput` fields as `stream` does.

        Returns the rendered prompt, its layout and scores [layers, heads, prompt tokens] aggregated over the
        seeds with the config's aggregation.
        """
        rendered, layout = self._prepare(prompt_input("query_attention", prompt, arguments))
        recorder = QueryAttentionRecorder(Selector(self.config.aggregation, 1))
        with self.runtime.lock, torch.inference_mode():
            recorder.prefill(self.runtime, [self._ids(rendered, layout)], [layout])
        return rendered, layout, torch.stack(recorder.layers)[..., : len(rendered.input_ids)]

    # ---------------------------------------------------------------- render, lay out, request

    def _prepare(self, prompt: PromptInput) -> tuple[RenderedPrompt, PromptLayout]:
        """Render the input, locate its documents and lay out its tokens; raises `ValueError`/`TypeError` for bad
        input or a prompt that (with its query suffix) exceeds the context window."""
        rendered = render(
            self.tokenizer, prompt.prompt, prompt.messages, prompt.input_ids, prompt.tools, prompt.tool_format
        )
        prunes = METHOD_CLASSES[self.config.method].prunes
        if prompt.documents is not None:
            rendered = rendered.with_documents(prompt.documents)
        elif self.config.span == "document" and prunes:
            raise ValueError('span="document" needs documents=[...]: the retrieved texts as they appear in the prompt')
        layout = (
            plan_layout(self.tokenizer, rendered, prompt.query, self.config)
            if prunes
            else PromptLayout.unpruned(len(rendered.input_ids))
        )
        length = len(rendered.input_ids) + len(layout.query_suffix_ids)
        if length > self.arch.max_positions:
            raise ValueError(
                f"the prompt has {length} tokens (including the query, appended to score selection) but "
                f"{self.model_name}'s context window is "
                f"{self.arch.max_positions}; retrieve fewer or shorter documents"
            )
        return rendered, layout

    def _ids(self, rendered: RenderedPrompt, layout: PromptLayout) -> torch.Tensor:
        return torch.tensor(rendered.input_ids + list(layout.query_suffix_ids), device=self.device)

    def _request(
        self,
        rendered: RenderedPrompt,
        layout: PromptLayout,
        events: queue.SimpleQueue,
        tag: int,
        sampling: SamplingParams,
    ) -> Request:
        """A request for the scheduler; raises `ValueError` for a `logit_bias` id outside the vocabulary and when
        the scheduler's limits refuse it."""
        sampler = sampling.sampler(self.tokenizer, self.runtime.eos_ids, self.device)
        request = Request(
            self._ids(rendered, layout),
            layout,
            self.config,
            sampler,
            sampling.max_new_tokens,
            events,
            torch.tensor([rendered.input_ids], device=self.device),
            tag,
        )
        self.scheduler.check(request)
        return request

    # ---------------------------------------------------------------- run and collect

    def _run(
        self, requests: list[Request], rendered: list[RenderedPrompt]
    ) -> Generator[tuple[int, str], None, list[GenerationResult]]:
        """Submit `requests` (sharing one event queue) and turn their events into `(i, text delta)`, i a request's
        tag (its index); returns their results. A consumer that leaves early cancels whatever still runs."""
        events, scheduler = requests[0].events, self.scheduler
        texts = [TextDeltas(self.tokenizer, r.sampler.stops) for r in requests]
        prefills: list[tuple[PrefillSequence, float] | None] = [None] * len(requests)
        started = [0.0] * len(requests)
        finished: list[tuple[str, float] | None] = [None] * len(requests)
        scheduler.submit(requests)
        try:
            while any(f is None for f in finished):
                kind, i, payload = scheduler.next_event(events)
                if finished[i] is not None:
                    continue  # tokens generated after the text already reached a stop string
                if kind == "error":
                    raise payload
                if kind == "prefill":
                    prefills[i], started[i] = payload, time.perf_counter()
                    continue
                if kind == "token":
                    delta, cut = texts[i].add(payload)
                    if delta:
                        yield i, delta
                    if not cut:
                        continue
                    scheduler.cancel([requests[i]])
                    payload = "stop"
                finished[i] = payload, time.perf_counter() - started[i]
                if tail := texts[i].flush():
                    yield i, tail
            return [
                self._result(r, *p, t, *f, q.sampler)
                for r, p, t, f, q in zip(rendered, prefills, texts, finished, requests)
            ]
        finally:
            # A no-op for finished requests; frees the sequences of a consumer that left. After the results, since
            # it also gives back the OpenMP team building them may have started in this thread.
            scheduler.cancel(requests)

    def _result(
        self,
        rendered: RenderedPrompt,
        prefilled: PrefillSequence,
        prefill_seconds: float,
        text: TextDeltas,
        finish_reason: str,
        decode_seconds: float,
        sampler: Sampler,
    ) -> GenerationResult:
        layout, kept = prefilled.layout, prefilled.kept_indices.cpu()
        kept_spans = rendered.char_spans(kept)
        output = text.tokens
        return GenerationResult(
            text=text.text,
            prompt_tokens=len(rendered.input_ids),
            kept_tokens=int(kept.numel()),
            output_tokens=len(output),
            kept_token_indices=kept.tolist(),
            kept_char_spans=kept_spans,
            prefill_seconds=prefill_seconds,
            decode_tokens_per_second=(len(output) - 1) / decode_seconds if len(output) > 1 else 0.0,
            kv_cache_bytes=prefilled.kv_cache_bytes,
            finish_reason=finish_reason,
            method=self.config.method,
            selection_layers=self.config.selection_layers,
            prompt_text=rendered.text,
            output_token_ids=output,
            decode_start_position=prefilled.next_position,
            context_source=layout.context_source,
            **layout.counts(kept),
            protected_char_spans=rendered.char_spans(torch.nonzero(~layout.prunable).flatten()),
            token_scores=None if prefilled.scores is None else prefilled.scores[: len(rendered.input_ids)].tolist(),
            document_retention=None
            if rendered.document_ranges is None
            else kept_shares(rendered.document_ranges, kept_spans),
            tool_format=rendered.tool_format,
            token_logprobs=None if sampler.logprobs is None else sampler.token_logprobs[: len(output)],
        )


def _deltas(events: Generator[tuple[int, str], None, list[GenerationResult]]):
    """One prompt's events as its text deltas; returns its result. Closing it closes `events` (which cancels)."""
    try:
        while True:
            try:
                _, delta = next(events)
            except StopIteration as done:
                return done.value[0]
            yield delta
    finally:
        events.close()
