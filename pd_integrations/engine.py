"""The PromptDistill inference path, top to bottom: render → lay out rows → method prefill → decode.

- render (`query.py`): the prompt, chat messages or token ids as tokens with character offsets;
- lay out rows (`layout.py`): which tokens are retrieved context (prunable), which rows seed selection, the probe;
- prefill (`methods/`): full attention, PromptDistill or GemFilter over HF's own layers; at a selection layer only
  the kept rows (original order, original RoPE positions) and every protected row continue;
- decode (here): one token at a time through every layer, continuing at the original prompt length.

An engine is a shared `Runtime` (weights, tokenizer, lock) plus a resolved config. Everything a call needs lives
in locals, its `Prefill` and its `DecodeState`, so calls never share state; the runtime's lock serialises forward
steps (prefill, each decode step), so concurrent calls interleave safely.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .config import PromptDistillConfig, resolve_config
from .layout import RowLayout, check_query, plan_layout
from .loading import DEFAULT_MODEL, load_model
from .methods import METHOD_CLASSES, Prefill, QueryAttentionRecorder, method_for
from .prompt import RenderedPrompt, kept_shares, render
from .results import GenerationResult, GenerationStream
from .runtime import Runtime
from .sampling import Constraint, Sampler, check_sampling, cut_at_stop, safe_length
from .selection import Selector

__all__ = ["DecodeState", "GenerationResult", "GenerationStream", "Prefill", "PromptDistillEngine"]

_RUNTIME_LOAD_SETTINGS = {"device", "dtype", "quantization"}


@dataclass
class DecodeState:
    """One call's decode state: the prefill's cache (extended in place), each layer's cached key positions (for
    sliding-window masks) and the next token's original position."""

    cache: DynamicCache
    key_positions: list[torch.Tensor]
    position: int

    @classmethod
    def after(cls, prefill: Prefill) -> DecodeState:
        return cls(prefill.cache, list(prefill.key_positions), prefill.next_position)


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
    def from_pretrained(cls, model_name: str = DEFAULT_MODEL, config: PromptDistillConfig | None = None,
                        **load_kwargs) -> PromptDistillEngine:
        """An engine over `model_name`, loaded once per process and `device`/`dtype`/`quantization` settings
        (`Runtime.load`); other `load_model` arguments (`device_map`, `trust_remote_code`) load a private copy."""
        if set(load_kwargs) <= _RUNTIME_LOAD_SETTINGS:
            return cls.from_runtime(Runtime.load(model_name, **load_kwargs), config)
        return cls.from_runtime(Runtime.wrap(*load_model(model_name, **load_kwargs), model_name), config)

    def _setup(self, runtime: Runtime, config: PromptDistillConfig | None) -> None:
        arch = runtime.arch
        self.runtime = runtime
        self.config = resolve_config(config, lambda: runtime.profile, runtime.model_name, arch.num_layers,
                                     arch.num_heads)

    def with_config(self, config: PromptDistillConfig) -> PromptDistillEngine:
        """An engine sharing this one's runtime (weights, tokenizer, lock, profile) with another config."""
        return PromptDistillEngine.from_runtime(self.runtime, config)

    model = property(lambda self: self.runtime.model)
    tokenizer = property(lambda self: self.runtime.tokenizer)
    arch = property(lambda self: self.runtime.arch)
    model_name = property(lambda self: self.runtime.model_name)
    device = property(lambda self: self.runtime.device)

    # ---------------------------------------------------------------- public API

    def generate(self, prompt: str | None = None, **kwargs) -> GenerationResult:
        """Generate a completion; takes the same arguments as `stream`. Returns a `GenerationResult`."""
        stream = self.stream(prompt, **kwargs)
        for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: str | None = None, *, messages: list | None = None, input_ids=None,
               query: str | None = None, documents: list[str] | None = None, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop: str | list[str] | None = None, constraint: Constraint | None = None) -> GenerationStream:
        """Generate from exactly one of `prompt` (raw text), `messages` (chat template) or `input_ids`.

        `query` is the question that seeds selection and is never pruned; `documents` are the retrieved texts as
        they appear in the prompt, the only text then pruned (see `pd_integrations.layout` for what is pruned
        without them). Greedy when `temperature == 0`. Generation ends at EOS, at a `stop` string (removed from
        the text) or after `max_new_tokens`. A `constraint` (see `pd_integrations.sampling.Constraint`) restricts
        each next token to a grammar and ends generation when its output is complete. Returns a `GenerationStream` of text deltas. Raises
        `ValueError`/`TypeError` for bad arguments, naming the parameter, before any model work.
        """
        stops = check_sampling(max_new_tokens, temperature, top_p, top_k, seed, stop)
        rendered, layout = self._prepare(prompt, messages, input_ids, query, documents)
        sampler = Sampler.create(self.tokenizer, self.runtime.eos_ids, self.device, temperature=temperature,
                                 top_p=top_p, top_k=top_k, seed=seed, stops=stops, constraint=constraint)
        return GenerationStream(self._generate(rendered, layout, max_new_tokens, sampler))

    def prefill(self, prompt: str | None = None, *, messages: list | None = None, input_ids=None,
                query: str | None = None, documents: list[str] | None = None) -> Prefill:
        """Run only the prefill and return its `Prefill` (cache, kept indices, next-token logits, layout)."""
        return self._prefill(*self._prepare(prompt, messages, input_ids, query, documents))

    def query_attention(self, prompt: str | None = None, *, messages: list | None = None, input_ids=None,
                       query: str | None = None,
                       documents: list[str] | None = None) -> tuple[RenderedPrompt, RowLayout, torch.Tensor]:
        """Per-layer, per-head attention of the seeds to every prompt token in an unpruned pass (for calibration).

        Returns the rendered prompt, its row layout and scores [layers, heads, prompt tokens] aggregated over the
        seeds with the config's aggregation.
        """
        rendered, layout = self._prepare(prompt, messages, input_ids, query, documents)
        recorder = QueryAttentionRecorder(Selector(self.config.aggregation or "softmax_mean", 1))
        with self.runtime.lock, torch.inference_mode():
            recorder.prefill(self.runtime, self._ids(rendered, layout), layout)
        return rendered, layout, torch.stack(recorder.layers)[..., : len(rendered.input_ids)]

    # ---------------------------------------------------------------- render, lay out, prefill

    def _prepare(self, prompt, messages, input_ids, query, documents) -> tuple[RenderedPrompt, RowLayout]:
        """Render the input, locate its documents and lay out its rows; raises `ValueError`/`TypeError` for bad
        input or a prompt that (with its probe) exceeds the context window."""
        rendered = render(self.tokenizer, prompt, messages, input_ids)
        check_query(query)  # also for methods that ignore it: a bad query is a caller's bug either way
        prunes = METHOD_CLASSES[self.config.method].prunes
        if documents is not None:
            rendered = rendered.with_documents(documents)
        elif self.config.span == "document" and prunes:
            raise ValueError('span="document" needs documents=[...]: the retrieved texts as they appear in the prompt')
        layout = plan_layout(self.tokenizer, rendered, query, self.config) if prunes else RowLayout.unpruned(
            len(rendered.input_ids))
        length = len(rendered.input_ids) + len(layout.probe_ids)
        if length > self.arch.max_positions:
            raise ValueError(
                f"the prompt has {length} tokens (query probe included) but {self.model_name}'s context window is "
                f"{self.arch.max_positions}; retrieve fewer or shorter documents"
            )
        return rendered, layout

    def _ids(self, rendered: RenderedPrompt, layout: RowLayout) -> torch.Tensor:
        return torch.tensor(rendered.input_ids + list(layout.probe_ids), device=self.device)

    def _prefill(self, rendered: RenderedPrompt, layout: RowLayout) -> Prefill:
        method = method_for(self.config, layout)
        started = time.perf_counter()
        with self.runtime.lock, torch.inference_mode():
            prefill = method.prefill(self.runtime, self._ids(rendered, layout), layout)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        prefill.seconds = time.perf_counter() - started
        return prefill

    # ---------------------------------------------------------------- decode

    def _decode_step(self, token: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Run one token at `state.position` through every layer, extending the cache; returns its logits."""
        arch = self.arch
        hidden = arch.decoder.embed_tokens(token.view(1, 1))
        positions = torch.tensor([state.position], device=token.device)
        cos_sin = arch.position_embeddings(hidden, positions[None])
        for i, layer in enumerate(arch.layers):
            mask = None
            if arch.windows[i] is not None:
                state.key_positions[i] = torch.cat([state.key_positions[i], positions])
                mask = arch.attention_mask(i, positions, state.key_positions[i], state.position, hidden.dtype)
            hidden = layer(hidden, attention_mask=mask, position_ids=positions[None], past_key_values=state.cache,
                           use_cache=True, position_embeddings=cos_sin[arch.layer_types[i]])
        state.position += 1
        return arch.logits(hidden[:, -1])[0]

    def _generate(self, rendered: RenderedPrompt, layout: RowLayout, max_new_tokens: int,
                  sampler: Sampler) -> Iterator[str]:
        """Prefill, then yield text deltas (held back while they may still grow into a stop string); returns the
        `GenerationResult`."""
        prefill = self._prefill(rendered, layout)
        kv_bytes = prefill.kv_cache_bytes  # before decoding grows the cache
        state, logits = DecodeState.after(prefill), prefill.logits
        sequence = torch.tensor([rendered.input_ids], device=self.device)
        output: list[int] = []
        text, emitted, finish_reason = "", 0, "length"
        started = time.perf_counter()
        for step in range(max_new_tokens):
            sequence, stopped = sampler.next_token(sequence, logits)
            output.append(int(sequence[0, -1]))  # the one host sync per step: the text needs the token
            text, cut = cut_at_stop(self.tokenizer.decode(output, skip_special_tokens=True), sampler.stops)
            if stopped or cut:
                finish_reason = "stop"
                break
            safe = safe_length(text, sampler.stops)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if step + 1 == max_new_tokens or state.position >= self.arch.max_positions:
                break
            with self.runtime.lock, torch.inference_mode():
                logits = self._decode_step(sequence[0, -1:], state)
        if len(text) > emitted:
            yield text[emitted:]
        return self._result(rendered, prefill, kv_bytes, text, output, finish_reason, time.perf_counter() - started)

    def _result(self, rendered: RenderedPrompt, prefill: Prefill, kv_bytes: int, text: str, output: list[int],
                finish_reason: str, decode_seconds: float) -> GenerationResult:
        layout, kept = prefill.layout, prefill.kept_indices.cpu()
        kept_spans = rendered.char_spans(kept)
        return GenerationResult(
            text=text, prompt_tokens=len(rendered.input_ids), kept_tokens=int(kept.numel()),
            output_tokens=len(output), kept_token_indices=kept.tolist(), kept_char_spans=kept_spans,
            prefill_seconds=prefill.seconds,
            decode_tokens_per_second=(len(output) - 1) / decode_seconds if len(output) > 1 else 0.0,
            kv_cache_bytes=kv_bytes, finish_reason=finish_reason, method=self.config.method,
            selection_layers=tuple(self.config.selection_layers or ()), prompt_text=rendered.text,
            output_token_ids=output, decode_start_position=prefill.next_position,
            context_source=layout.context_source, **layout.counts(kept),
            protected_char_spans=rendered.char_spans(torch.nonzero(~layout.prunable).flatten()),
            token_scores=None if prefill.scores is None else prefill.scores[: len(rendered.input_ids)].tolist(),
            document_retention=None if rendered.document_ranges is None else kept_shares(rendered.document_ranges,
                                                                                       kept_spans),
        )
