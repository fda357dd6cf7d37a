"""What a generation returns: `GenerationResult`, and `GenerationStream` for text deltas as they come."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class GenerationResult:
    """One generation: the text and what PromptDistill kept to produce it.

    `kept_token_indices` index the rendered prompt's tokens; `kept_char_spans` and `protected_char_spans` are
    merged character ranges of `prompt_text` (the prompt as rendered, chat template included). Only retrieved
    context is prunable (see `pd_integrations.layout`): `context_source` says how it was found ("documents",
    "template" when an adapter took it from a prompt template, "heuristic", "positional" or "none"), and
    `protected_tokens` + `prunable_tokens` = `prompt_tokens`, of which `kept_prunable_tokens` survived.
    `prefill_seconds` is the time to first token. `document_retention` is, for a call that named its `documents`,
    each one's share of characters kept. `query_free` is True when the prompt had nothing to seed selection (no
    query, no question line, only a summary-style instruction or the template's tail), so nothing was pruned.
    `tool_format` says how tools and tool messages were rendered ("template": the model's chat template;
    "builtin": the built-in Hermes text; None: there were none).
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
    query_free: bool = False
    tool_format: str | None = None
    token_logprobs: list | None = field(default=None, repr=False)  # `sampling.TokenLogprob`s, with logprobs=

    def usage(self) -> dict[str, int]:
        """OpenAI's usage counts: every prompt token counts, pruned or not."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.prompt_tokens + self.output_tokens,
        }

    def stats(self) -> dict:
        """What PromptDistill kept, as the adapters report it (LangChain `response_metadata["promptdistill"]`,
        LlamaIndex `additional_kwargs["promptdistill"]`). `kept_char_spans` index `prompt_text`; for a call that
        named its `documents`, `document_retention` holds each one's kept share (else pass the spans and the
        texts to `pd_integrations.kept_view.document_retention`)."""
        retention = {} if self.document_retention is None else {"document_retention": self.document_retention}
        tools = {} if self.tool_format is None else {"tool_format": self.tool_format}
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
            "query_free": self.query_free,
            "protected_char_spans": self.protected_char_spans,
            "prompt_text": self.prompt_text,
            **retention,
            **tools,
        }


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


class BatchStream(GenerationStream):
    """Iterate for the `(row, text_delta)` events of a batched generation; after exhaustion `result` holds one
    `GenerationResult` per row, in row order."""
