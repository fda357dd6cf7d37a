"""`PromptDistillStatsHandler`: what PromptDistill kept in each model call of a LangChain run.

A chain that ends in a parser (`StrOutputParser`, a structured-output parser) returns text or objects, and the
`AIMessage` that carried `response_metadata["promptdistill"]` is gone; a callback handler sees every model call's
result on its way, as LangChain's own usage handlers do.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import ChatGeneration, Generation, LLMResult


class PromptDistillStatsHandler(BaseCallbackHandler):
    """Records what PromptDistill kept in every `ChatPromptDistill`/`PromptDistillLLM` call of the runs it is
    given to, in the order the calls end, in `calls`: each entry is the call's `promptdistill` metadata
    (`prompt_tokens`, `kept_tokens`, `kept_ratio`, `context_source`, `query_free`, `document_retention` when the
    documents were known, `prefill_seconds`, ...) plus `model_name` and `call_seconds`, the model run's wall time.

    Pass it per run, `chain.invoke(x, config={"callbacks": [handler]})`, or to the model,
    `ChatPromptDistill(callbacks=[handler])`. Streamed calls are recorded once the stream has ended; a batch
    records one entry per prompt. Calls of other models are ignored.
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._started: dict[UUID, float] = {}

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list, *, run_id: UUID, **kwargs: Any) -> None:
        self._started[run_id] = time.perf_counter()

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any) -> None:
        self._started[run_id] = time.perf_counter()

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        started = self._started.pop(run_id, None)
        seconds = None if started is None else time.perf_counter() - started
        for generations in response.generations:
            for generation in generations:
                metadata = _metadata(generation)
                if "promptdistill" in metadata:
                    self.calls.append(
                        {**metadata["promptdistill"], "model_name": metadata.get("model_name"), "call_seconds": seconds}
                    )

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._started.pop(run_id, None)

    def reset(self) -> None:
        """Forget the recorded calls."""
        self.calls.clear()


def _metadata(generation: Generation) -> dict[str, Any]:
    # Chat models report on the message, text-completion models in `generation_info`.
    if isinstance(generation, ChatGeneration):
        return generation.message.response_metadata or {}
    return generation.generation_info or {}
