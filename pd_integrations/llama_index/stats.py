"""Collecting what PromptDistill kept across the LLM calls of a query engine.

A LlamaIndex `Response` has no place for the LLM's own statistics, so they travel like token counts do: on each
LLM response (`additional_kwargs["promptdistill"]`), read by a callback handler at the end of each LLM event.
"""

from __future__ import annotations

import time
from typing import Any

from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.callbacks.base_handler import BaseCallbackHandler


class PromptDistillStatsHandler(BaseCallbackHandler):
    """Records what PromptDistill kept in every `PromptDistillLLM` call, in call order, in `calls`: each entry is
    the response's `additional_kwargs["promptdistill"]` (`prompt_tokens`, `kept_tokens`, `kept_ratio`,
    `context_source`, `query_free`, `document_retention` when the documents were known, `prefill_seconds`, ...)
    plus `call_seconds`, the LLM event's wall time. Completions, chats, their streams and structured calls
    (`structured_predict`, `as_structured_llm`, query engines with `output_cls`) are all recorded.

    Install it as you would `TokenCountingHandler`: `Settings.callback_manager = CallbackManager([handler])` before
    building the query engine (which hands that manager to its LLM), or `callback_manager=` to the LLM or to
    `RetrieverQueryEngine.from_args`. A streamed call is recorded once its stream has been read to the end.
    """

    def __init__(self) -> None:
        super().__init__(event_starts_to_ignore=[], event_ends_to_ignore=[])
        self.calls: list[dict] = []
        self._started: dict[str, float] = {}

    def on_event_start(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        parent_id: str = "",
        **kwargs: Any,
    ) -> str:
        if event_type == CBEventType.LLM:
            self._started[event_id] = time.perf_counter()
        return event_id

    def on_event_end(
        self, event_type: CBEventType, payload: dict[str, Any] | None = None, event_id: str = "", **kwargs: Any
    ) -> None:
        if event_type != CBEventType.LLM:
            return
        started = self._started.pop(event_id, None)
        # Completions end with COMPLETION, chats with RESPONSE.
        response = (payload or {}).get(EventPayload.COMPLETION) or (payload or {}).get(EventPayload.RESPONSE)
        stats = getattr(response, "additional_kwargs", {}).get("promptdistill")
        if stats is not None:
            seconds = None if started is None else time.perf_counter() - started
            self.calls.append({**stats, "call_seconds": seconds})

    def start_trace(self, trace_id: str | None = None) -> None:
        pass

    def end_trace(self, trace_id: str | None = None, trace_map: dict[str, list[str]] | None = None) -> None:
        pass

    def reset(self) -> None:
        """Forget the recorded calls."""
        self.calls.clear()
