"""The PromptDistill inference path, top to bottom: render → lay out rows → prefill with selection → decode.

Prefill drives `model.model.layers` one by one with HF's own decoder layers, rotary embedding, `DynamicCache` and
attention functions. At a selection layer the prunable rows (retrieved context, see `layout.py`) are scored by the seeds'
attention, and only the kept rows (original order, original RoPE positions) and every protected row continue to
later layers. Decoding continues at the original
prompt length. Everything a call needs lives in local variables and a per-call `Prefill`, so calls never share
state; a lock serialises the model's forward steps (prefill, each decode step), so concurrent calls interleave
safely without oversubscribing the CPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import (
    DynamicCache,
    EosTokenCriteria,
    LogitsProcessorList,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .arch import Architecture
from .config import PromptDistillConfig, resolve_config
from .loading import DEFAULT_MODEL, load_model
from .layout import RowLayout, plan_layout
from .query import RenderedPrompt, kept_shares, render
from .selection import Selector


@dataclass
class GenerationResult:
    """One generation: the text and what PromptDistill kept to produce it.

    `kept_token_indices` index the rendered prompt's tokens; `kept_char_spans` and `protected_char_spans` are
    merged character ranges of `prompt_text` (the prompt as rendered, chat template included). Only retrieved
    context is prunable (see `pd_integrations.layout`): `context_source` says how it was found ("documents",
    "template" when an adapter took it from a prompt template, "heuristic", "positional" or "none"), and
    `protected_tokens` + `prunable_tokens` = `prompt_tokens`, of which `kept_prunable_tokens` survived.
    `prefill_seconds` is the time to first token. `document_retention` is, for a call that named its `documents`,
    each one's share of characters kept.
    """

    text: str
    prompt_tokens: int
    kept_tokens: int
    output_tokens: int
    kept_token_indices: list[int]
    kept_char_spans: list[tuple[int, int]]
    prefill_seconds: float
    decode_tokens_per_second: float
    kv_cache_bytes: int
    finish_reason: str
    method: str
    selection_layers: tuple[int, ...]
    prompt_text: str | None
    output_token_ids: list[int]
    decode_start_position: int
    context_source: str = "none"
    protected_tokens: int = 0
    prunable_tokens: int = 0
    kept_prunable_tokens: int = 0
    protected_char_spans: list[tuple[int, int]] = field(default_factory=list)
    token_scores: list[float] | None = field(default=None, repr=False)
    document_retention: list[float] | None = None

    def stats(self) -> dict:
        """What PromptDistill kept, as the adapters report it (LangChain `response_metadata["promptdistill"]`,
        LlamaIndex `additional_kwargs["promptdistill"]`). `kept_char_spans` index `prompt_text`; for a call that
        named its `documents`, `document_retention` holds each one's kept share (else pass the spans and the
        texts to `pd_integrations.inspect.document_retention`)."""
        retention = {} if self.document_retention is None else {"document_retention": self.document_retention}
        return {
            "prompt_tokens": self.prompt_tokens,
            "kept_tokens": self.kept_tokens,
            "kept_ratio": self.kept_tokens / self.prompt_tokens,
            "prefill_seconds": self.prefill_seconds,
            "selection_layers": list(self.selection_layers),
            "kept_char_spans": self.kept_char_spans,
            "method": self.method,
            "context_source": self.context_source,
            "protected_tokens": self.protected_tokens,
            "prunable_tokens": self.prunable_tokens,
            "kept_prunable_tokens": self.kept_prunable_tokens,
            "protected_char_spans": self.protected_char_spans,
            "prompt_text": self.prompt_text,
            **retention,
        }


@dataclass
class Prefill:
    """Per-call state after prefill: the cache, the original positions of each layer's cached keys, the next-token
    logits and what was kept. `kept_indices` are prompt token indices whose states reached the last layer;
    `stage_kept` holds the kept indices after each selection stage; `scores` are first-stage selection scores per
    prompt token (0 before the first stage's selection); `layout` says what was prunable."""

    cache: DynamicCache
    key_positions: list[torch.Tensor]
    next_position: int
    logits: torch.Tensor
    kept_indices: torch.Tensor
    stage_kept: list[torch.Tensor]
    scores: torch.Tensor | None
    layout: RowLayout | None = None
    seconds: float = 0.0

    @property
    def kv_cache_bytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)


class GenerationStream:
    """Iterate for text deltas; after exhaustion `result` holds the `GenerationResult`."""

    def __init__(self, events: Iterator[str]):
        self._events = events
        self._result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        self._result = yield from self._events

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            raise RuntimeError("the stream has not finished; iterate it to the end first")
        return self._result

    def map_result(self, change: Callable[[GenerationResult], GenerationResult]) -> GenerationStream:
        """The same deltas, with `change(result)` as the result (adapters add what only they know)."""
        def events() -> Iterator[str]:
            yield from self
            return change(self.result)
        return GenerationStream(events())


class PromptDistillEngine:
    """Runs prompts through a Hugging Face causal LM with PromptDistill selection during prefill.

    `config` fields left unset are filled from the model's profile (see `resolve_config`); `engine.config` is the
    resolved config. Raises `UnsupportedArchitectureError` for an unknown model family and `ValueError` for a
    config that doesn't fit the model.
    """

    def __init__(self, model, tokenizer, config: PromptDistillConfig | None = None, *, model_name: str | None = None,
                 _lock: threading.Lock | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.arch = Architecture(model)
        self.model_name = model_name or model.config.name_or_path or model.config.model_type
        self.config = resolve_config(config, self.model_name, self.arch.num_layers, self.arch.num_heads)
        self._lock = _lock or threading.Lock()
        eos = model.generation_config.eos_token_id
        self._eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @classmethod
    def from_pretrained(cls, model_name: str = DEFAULT_MODEL, config: PromptDistillConfig | None = None,
                        **load_kwargs) -> PromptDistillEngine:
        """Load `model_name` with `load_model(**load_kwargs)` and wrap it."""
        model, tokenizer = load_model(model_name, **load_kwargs)
        return cls(model, tokenizer, config, model_name=model_name)

    def with_config(self, config: PromptDistillConfig) -> PromptDistillEngine:
        """An engine sharing this one's model, tokenizer and lock, with another config."""
        return PromptDistillEngine(self.model, self.tokenizer, config, model_name=self.model_name, _lock=self._lock)

    @property
    def device(self) -> torch.device:
        return self.arch.decoder.embed_tokens.weight.device

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
               stop: str | list[str] | None = None) -> GenerationStream:
        """Generate from exactly one of `prompt` (raw text), `messages` (chat template) or `input_ids`.

        `query` is the question that seeds selection (see `plan_query`). `documents` are the retrieved texts as
        they appear in the prompt: span units never cross their boundaries, and `span="document"` (which needs
        them) keeps whole documents. Greedy when `temperature == 0`.
        Generation ends at EOS, at a `stop` string (removed from the text) or after `max_new_tokens`.
        Returns a `GenerationStream` of text deltas. Raises `ValueError`/`TypeError` for bad arguments,
        naming the parameter, before any model work.
        """
        stops = _check_sampling(max_new_tokens, temperature, top_p, top_k, seed, stop)
        rendered, layout = self._prepare(prompt, messages, input_ids, query, documents)
        return GenerationStream(self._generate(rendered, layout, max_new_tokens, temperature, top_p, top_k, seed,
                                               stops))

    def prefill(self, prompt: str | None = None, *, messages: list | None = None, input_ids=None,
                query: str | None = None, documents: list[str] | None = None) -> Prefill:
        """Run only the prefill and return its `Prefill` state (cache, kept indices, next-token logits, layout)."""
        return self._prefill(*self._prepare(prompt, messages, input_ids, query, documents))

    def seed_attention(self, prompt: str | None = None, *, messages: list | None = None, input_ids=None,
                       query: str | None = None,
                       documents: list[str] | None = None) -> tuple[RenderedPrompt, RowLayout, torch.Tensor]:
        """Per-layer, per-head attention of the seeds to every prompt token in an unpruned pass (for calibration).

        Returns the rendered prompt, its row layout and scores [layers, heads, prompt tokens] aggregated over the
        seeds with the config's aggregation.
        """
        rendered, layout = self._prepare(prompt, messages, input_ids, query, documents)
        ids = torch.tensor(rendered.input_ids + list(layout.probe_ids), device=self.device)
        layers: list[torch.Tensor] = []
        with self._lock, torch.inference_mode():
            self._forward_prompt(ids, layout, [], observe=lambda i, scores: layers.append(scores))
        return rendered, layout, torch.stack(layers)[..., : len(rendered.input_ids)]

    # ---------------------------------------------------------------- prefill

    def _prepare(self, prompt, messages, input_ids, query, documents) -> tuple[RenderedPrompt, RowLayout]:
        """Render the input, locate its documents and lay out its rows; raises `ValueError`/`TypeError` for bad
        input or a prompt that (with its probe) exceeds the context window."""
        rendered = render(self.tokenizer, prompt, messages, input_ids)
        if documents is not None:
            rendered = rendered.with_documents(documents)
        elif self.config.span == "document" and self.config.method != "full":
            raise ValueError('span="document" needs documents=[...]: the retrieved texts as they appear in the prompt')
        layout = plan_layout(self.tokenizer, rendered, query, self.config)
        length = len(rendered.input_ids) + len(layout.probe_ids)
        if length > self.arch.max_positions:
            raise ValueError(
                f"the prompt has {length} tokens (query probe included) but {self.model_name}'s context window is "
                f"{self.arch.max_positions}; retrieve fewer or shorter documents"
            )
        return rendered, layout

    def _prefill(self, rendered: RenderedPrompt, layout: RowLayout) -> Prefill:
        ids = torch.tensor(rendered.input_ids + list(layout.probe_ids), device=self.device)
        started = time.perf_counter()
        with self._lock, torch.inference_mode():
            if self.config.method == "gemfilter":
                state = self._prefill_gemfilter(ids, layout)
            else:
                stages = [] if self.config.method == "full" else self._stages(layout)
                state = self._forward_prompt(ids, layout, stages)
            _synchronize(self.device)
        state.seconds = time.perf_counter() - started
        state.layout = layout
        return state

    def _stages(self, layout: RowLayout) -> list[tuple[int, int, tuple[int, ...] | None]]:
        """(layer, budget of prunable tokens, heads) per selection stage."""
        config = self.config
        budgets = layout.stage_budgets(config.budgets)
        heads = config.heads or (None,) * len(budgets)
        return list(zip(config.selection_layers, budgets, heads))

    def _forward_prompt(self, ids: torch.Tensor, layout: RowLayout, stages: list, last_layer: int | None = None,
                        observe: Callable[[int, torch.Tensor], None] | None = None) -> Prefill:
        """Prefill `ids` (prompt, then probe) at positions 0..n-1 through layers 0..`last_layer` (default: all),
        selecting among `layout`'s prunable rows at each stage's layer, in whole span units when it has them.
        `observe(layer, head_scores)`, when given, receives every layer's per-head seed scores [H, rows] (for
        calibration). Returns the `Prefill`; with `last_layer` set, its logits are empty."""
        arch, config = self.arch, self.config
        n = ids.shape[0]
        positions = torch.arange(n, device=ids.device)
        hidden = arch.decoder.embed_tokens(ids[None])
        cos_sin = arch.position_embeddings(hidden, positions[None])
        cache = DynamicCache()
        key_positions: list[torch.Tensor] = []
        candidates = layout.candidates().to(ids.device)
        remaining = layout.num_prunable  # candidates among the current rows, tracked on the host
        units = layout.units.to(ids.device) if layout.units is not None else None
        probe_rows = len(layout.probe_ids)
        selector = Selector(config.aggregation or "softmax_mean", config.pool_kernel or 1)
        stage_by_layer = {layer: (budget, heads) for layer, budget, heads in stages}
        final_stage = stages[-1][0] if stages else -1
        stage_kept, first_scores = [], None
        masks: dict[int | None, torch.Tensor | None] = {}  # per sliding window, for the current rows
        layers = arch.layers if last_layer is None else arch.layers[: last_layer + 1]
        for i, layer in enumerate(layers):
            layer_input = hidden
            hidden = layer(
                hidden,
                attention_mask=_memo(masks, arch.windows[i],
                                     lambda: arch.attention_mask(i, positions, positions, n - 1, hidden.dtype)),
                position_ids=positions[None],
                past_key_values=cache,
                use_cache=True,
                position_embeddings=cos_sin[arch.layer_types[i]],
            )
            key_positions.append(positions)
            rows = hidden.shape[1]
            seeds = slice(rows - layout.num_seeds, rows)
            if observe is not None:
                observe(i, self._seed_head_scores(selector, i, layer_input, cache, positions, cos_sin, seeds))
            if i not in stage_by_layer:
                continue
            budget, heads = stage_by_layer[i]
            keep, scores = None, None
            if budget < remaining:
                head_scores = self._seed_head_scores(selector, i, layer_input, cache, positions, cos_sin, seeds)
                scores = selector.score(head_scores, heads)
                keep = selector.keep(scores, candidates, remaining, budget,
                                     units[positions] if units is not None else None)
                remaining = budget
            if first_scores is None and scores is not None:
                first_scores = torch.zeros(n, device=ids.device).index_put_((positions,), scores)
            probe = probe_rows if i == final_stage else 0
            if probe:
                # The probe only seeds selection: drop it from the rows and every cache so far.
                keep = (keep if keep is not None else torch.arange(rows, device=ids.device))[:-probe]
            if keep is not None:
                hidden, positions, candidates, masks = hidden[:, keep], positions[keep], candidates[keep], {}
                cos_sin = {kind: (cos[:, keep], sin[:, keep]) for kind, (cos, sin) in cos_sin.items()}
                for j in range(i + 1) if config.cache_truncation else ():
                    _gather_layer(cache.layers[j], keep)
                    key_positions[j] = positions
                for j in range(i + 1) if probe and not config.cache_truncation else ():
                    cache.layers[j].crop(-probe)
                    key_positions[j] = key_positions[j][:-probe]
            stage_kept.append(positions)
        logits = arch.logits(hidden[:, -1])[0] if last_layer is None else torch.empty(0)
        return Prefill(cache, key_positions, n - probe_rows, logits, positions, stage_kept, first_scores)

    def _seed_head_scores(self, selector: Selector, layer_idx: int, layer_input: torch.Tensor,
                          cache: DynamicCache, positions: torch.Tensor, cos_sin: dict, seeds: slice) -> torch.Tensor:
        """Per-head scores [H, rows] of the current rows by the `seeds` rows' attention at `layer_idx`."""
        cos, sin = cos_sin[self.arch.layer_types[layer_idx]]
        queries = self.arch.seed_queries(layer_idx, layer_input[:, seeds], (cos[:, seeds], sin[:, seeds]))
        return selector.head_scores(self.arch, layer_idx, queries, cache.layers[layer_idx].keys,
                                    positions[seeds], positions)

    def _prefill_gemfilter(self, ids: torch.Tensor, layout: RowLayout) -> Prefill:
        """GemFilter: select at layer s from a partial pass, then a fresh full pass over the kept tokens with
        renumbered positions. Decoding continues after the kept length."""
        stages = self._stages(layout)
        scout = self._forward_prompt(ids, layout, stages, last_layer=stages[0][0])
        kept = scout.kept_indices
        state = self._forward_prompt(ids[kept], RowLayout.unpruned(kept.shape[0]), [])
        state.kept_indices, state.stage_kept, state.scores = kept, [kept], scout.scores
        return state

    # ---------------------------------------------------------------- decode

    def _decode_step(self, token: torch.Tensor, position: int, state: Prefill) -> torch.Tensor:
        """Run one token at original `position` through every layer, extending the cache; returns its logits."""
        arch = self.arch
        hidden = arch.decoder.embed_tokens(token.view(1, 1))
        positions = torch.tensor([position], device=token.device)
        cos_sin = arch.position_embeddings(hidden, positions[None])
        for i, layer in enumerate(arch.layers):
            mask = None
            if arch.windows[i] is not None:
                state.key_positions[i] = torch.cat([state.key_positions[i], positions])
                mask = arch.attention_mask(i, positions, state.key_positions[i], position, hidden.dtype)
            hidden = layer(hidden, attention_mask=mask, position_ids=positions[None], past_key_values=state.cache,
                           use_cache=True, position_embeddings=cos_sin[arch.layer_types[i]])
        return arch.logits(hidden[:, -1])[0]

    def _generate(self, rendered: RenderedPrompt, layout: RowLayout, max_new_tokens: int, temperature: float,
                  top_p: float, top_k: int, seed: int | None, stops: list[str]):
        state = self._prefill(rendered, layout)
        kv_bytes = state.kv_cache_bytes
        processors = LogitsProcessorList()
        if temperature > 0:
            processors.append(TemperatureLogitsWarper(temperature))
            if top_k > 0:
                processors.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
        criteria = StoppingCriteriaList([EosTokenCriteria(self._eos_ids)] if self._eos_ids else [])
        if stops:
            criteria.append(StopStringCriteria(self.tokenizer, stops))
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        sequence = torch.tensor([rendered.input_ids], device=self.device)
        logits, position = state.logits, state.next_position
        decode_position = position
        output: list[int] = []
        text, emitted, finish_reason = "", 0, "length"
        decode_started = time.perf_counter()
        for step in range(max_new_tokens):
            scores = processors(sequence, logits[None].float())
            if temperature > 0:
                token = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)[0]
            else:
                token = scores[0].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token[None]], dim=-1)
            output.append(int(token))
            text, stopped = _cut_at_stop(self.tokenizer.decode(output, skip_special_tokens=True), stops)
            if stopped or bool(criteria(sequence, scores)[0]):
                finish_reason = "stop"
                break
            safe = _safe_length(text, stops)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if step + 1 == max_new_tokens or position + 1 >= self.arch.max_positions:
                break
            with self._lock, torch.inference_mode():
                logits = self._decode_step(token, position, state)
            position += 1
        decode_seconds = time.perf_counter() - decode_started
        if len(text) > emitted:
            yield text[emitted:]
        kept_spans = rendered.char_spans(state.kept_indices.cpu())
        return GenerationResult(
            text=text,
            prompt_tokens=len(rendered.input_ids),
            kept_tokens=int(state.kept_indices.numel()),
            output_tokens=len(output),
            kept_token_indices=state.kept_indices.tolist(),
            kept_char_spans=kept_spans,
            prefill_seconds=state.seconds,
            decode_tokens_per_second=(len(output) - 1) / decode_seconds if len(output) > 1 else 0.0,
            kv_cache_bytes=kv_bytes,
            finish_reason=finish_reason,
            method=self.config.method,
            selection_layers=tuple(self.config.selection_layers or ()),
            prompt_text=rendered.text,
            output_token_ids=output,
            decode_start_position=decode_position,
            context_source=layout.context_source,
            **layout.counts(state.kept_indices),
            protected_char_spans=rendered.char_spans(torch.nonzero(~layout.prunable).flatten()),
            token_scores=state.scores[: len(rendered.input_ids)].tolist() if state.scores is not None else None,
            document_retention=None if rendered.document_ranges is None else kept_shares(
                rendered.document_ranges, kept_spans),
        )


def _memo(memo: dict, key, compute):
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def _gather_layer(layer, keep: torch.Tensor) -> None:
    layer.keys = layer.keys.index_select(-2, keep)
    layer.values = layer.values.index_select(-2, keep)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` cut before the earliest stop string, and whether one occurred."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of `text` can be emitted: hold back a tail that may still grow into a stop string, and an
    incomplete UTF-8 character."""
    safe = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                safe = min(safe, len(text) - k)
                break
    if text.endswith("\ufffd"):
        safe = min(safe, len(text) - 1)
    return safe


def _check_sampling(max_new_tokens, temperature, top_p, top_k, seed, stop) -> list[str]:
    """Validate sampling arguments; returns the stop strings as a list."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise TypeError(f"stop must be a non-empty str or a list of non-empty str, got {stop!r}")
    return list(stops)
