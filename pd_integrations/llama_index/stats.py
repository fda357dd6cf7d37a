"""Collecting what PromptDistill kept across the LLM calls of a query engine.

A LlamaIndex `Response` has no place for the LLM's own statistics, so they travel like token counts do: on each
LLM response (`additional_kwargs["promptdistill"]`), read by a callback handler at the end of each LLM event.
"""

from __future__ import annotations

from typing import Any, Optional

from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.callbacks.base_handler import BaseCallbackHandler


class PromptDistillStatsHandler(BaseCallbackHandler):
    """Records `additional_kwargs["promptdistill"]` of every `PromptDistillLLM` call, in call order, in `calls`.

    Install it as you would `TokenCountingHandler`: `Settings.callback_manager = CallbackManager([handler])` before
    building the query engine (which hands that manager to its LLM), or `callback_manager=` to
    `RetrieverQueryEngine.from_args`. A streamed call is recorded once its stream has been read to the end.
    """

    def __init__(self) -> None:
        super().__init__(event_starts_to_ignore=[], event_ends_to_ignore=[])
        self.calls: list[dict] = []

    def on_event_start(self, event_type: CBEventType, payload: Optional[dict[str, Any]] = None, event_id: str = "",
                       parent_id: str = "", **kwargs: Any) -> str:
        return event_id

    def on_event_end(self, event_type: CBEventType, payload: Optional[dict[str, Any]] = None, event_id: str = "",
                     **kwargs: Any) -> None:
        if event_type != CBEventType.LLM or not payload:
            return
        # Completions end with COMPLETION, chats with RESPONSE.
        response = payload.get(EventPayload.COMPLETION) or payload.get(EventPayload.RESPONSE)
        stats = getattr(response, "additional_kwargs", {}).get("promptdistill")
        if stats is not None:
            self.calls.append(stats)

    def start_trace(self, trace_id: Optional[str] = None) -> None:
        pass

    def end_trace(self, trace_id: Optional[str] = None, trace_map: Optional[dict[str, list[str]]] = None) -> None:
        pass

    def reset(self) -> None:
        """Forget the recorded calls."""
        self.calls.clear()
