"""`PromptDistillLLM`: a LangChain text-completion model whose prefill prunes retrieved context inside the model."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from ._common import PromptDistillSettings, usage_metadata


class PromptDistillLLM(PromptDistillSettings, BaseLLM):
    """A Hugging Face causal LM run through PromptDistill on raw text prompts (no chat template).

    The question that seeds selection comes from `pd_query` (per call or via `.bind(pd_query=...)`), else the
    prompt's last tokens; pass `pd_query` for question-first prompts. `pd_documents` (the retrieved `Document`s
    or texts) keeps span units inside document boundaries and adds per-document `document_retention` to
    `promptdistill`, as in `ChatPromptDistill`. Per call, `model=` runs another model, and
    `temperature`, `max_tokens`, `top_p`, `top_k`, `seed` and every `PromptDistillConfig` field (`method="full"`,
    `budgets=(0.25,)`, ...) override the constructor's values, as in `ChatPromptDistill`.

    `batch` runs the prompts one after another, so each result equals a separate `invoke`. Per prompt,
    `generation_info` holds `finish_reason`, `model_name`, `usage_metadata` and `promptdistill` (prompt/kept
    tokens, kept ratio, prefill seconds, selection layers, kept character spans of `prompt_text`, method);
    `llm_output` holds `model_name` and the summed `token_usage`. `streaming=True` fires `on_llm_new_token` from
    `invoke` and `batch` too.
    """

    @property
    def _llm_type(self) -> str:
        return "promptdistill"

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        call = self._prepare_call(stop, kwargs)

        def generate(prompt: str) -> Generation:
            stream = call.stream(prompt=prompt)
            for delta in stream:
                if self.streaming and run_manager:
                    run_manager.on_llm_new_token(delta, chunk=GenerationChunk(text=delta))
            info = {**call.response_metadata(stream.result), "usage_metadata": usage_metadata(stream.result)}
            return Generation(text=stream.result.text, generation_info=info)

        # `batch` hands every prompt to one `_generate`: run them at once, so the engine's scheduler batches them.
        with ThreadPoolExecutor(max_workers=max(1, len(prompts))) as pool:
            generations = [[generation] for generation in pool.map(generate, prompts)]
        usages = [generation.generation_info["usage_metadata"] for [generation] in generations]
        token_usage = {key: sum(usage[key] for usage in usages) for key in usages[0]} if usages else {}
        return LLMResult(
            generations=generations, llm_output={"model_name": call.model_name, "token_usage": token_usage}
        )

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        call = self._prepare_call(stop, kwargs)
        stream = call.stream(prompt=prompt)
        for delta in stream:
            chunk = GenerationChunk(text=delta)
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        result = stream.result
        # Metadata once, on the last chunk, so that merging the chunks' generation_info keeps it intact.
        yield GenerationChunk(
            text="", generation_info={**call.response_metadata(result), "usage_metadata": usage_metadata(result)}
        )
