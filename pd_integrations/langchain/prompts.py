"""`DistillPrompt`: carries each chain input's question and retrieved documents to `ChatPromptDistill`.

A chain formats its prompt from the input (`{"context": docs, "question": q}`), and the model sees only the
formatted messages. `DistillPrompt` wraps the chain's prompt template: it formats as the template does, and tags
the last message with the input's question and documents (in `additional_kwargs["promptdistill"]`, which other
chat models ignore). `ChatPromptDistill` reads the tag, so only those documents are pruned and the question seeds
selection, per input, in `invoke`, `batch`, `stream` and their async forms, with no per-question rebinding.
"""

from __future__ import annotations

from typing import Any

from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.prompt_values import ChatPromptValue
from langchain_core.prompts import BasePromptTemplate
from pydantic import model_validator

TAG = "promptdistill"


class DistillPrompt(BasePromptTemplate):
    """A prompt template that formats as `prompt` does and tells `ChatPromptDistill` which input is the question
    and which the retrieved context.

    `context_key`'s value may be a list of `Document`s or strings, which this prompt joins with
    `document_separator` (so a chain needs no `format_docs` step), or a string already joined that way (as
    `create_stuff_documents_chain` passes it), which it splits there. Raises `ValueError` at construction when
    `question_key` or `context_key` is not one of `prompt`'s input variables.

    Example:
        ```python
        prompt = DistillPrompt(prompt=ChatPromptTemplate.from_messages(
            [("human", "Question: {question}\\nContext: {context}\\nAnswer:")]))
        chain = {"context": retriever, "question": RunnablePassthrough()} | prompt | ChatPromptDistill(budgets=0.25)
        chain.invoke("Who approves travel expenses?")
        ```
    """

    prompt: BasePromptTemplate
    question_key: str = "question"
    context_key: str = "context"
    document_separator: str = "\n\n"

    @model_validator(mode="before")
    @classmethod
    def _inherit_variables(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("prompt"), BasePromptTemplate):
            values.setdefault("input_variables", list(values["prompt"].input_variables))
        return values

    @model_validator(mode="after")
    def _check_keys(self) -> DistillPrompt:
        for name in ("question_key", "context_key"):
            if getattr(self, name) not in self.input_variables:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not an input variable of the prompt; its "
                    f"variables are {self.input_variables}"
                )
        if not self.document_separator:
            raise ValueError("document_separator must be a non-empty str")
        return self

    @property
    def _prompt_type(self) -> str:
        return "promptdistill"

    def format(self, **kwargs: Any) -> str:
        return self.prompt.format(**self._with_context_text(kwargs)[0])

    def format_prompt(self, **kwargs: Any) -> ChatPromptValue:
        """The wrapped prompt's messages, the last one tagged with the question and the document texts."""
        kwargs, documents = self._with_context_text(kwargs)
        messages = self.prompt.format_prompt(**kwargs).to_messages()
        question = kwargs[self.question_key]
        tag = {
            "query": question if isinstance(question, str) and question.strip() else None,
            "documents": documents or None,
        }
        last = messages[-1]
        messages[-1] = last.model_copy(update={"additional_kwargs": {**last.additional_kwargs, TAG: tag}})
        return ChatPromptValue(messages=messages)

    def _with_context_text(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """`kwargs` with the context as one string, and the document texts in it."""
        context = kwargs[self.context_key]
        if isinstance(context, str):
            documents = [piece for piece in context.split(self.document_separator) if piece.strip()]
            return kwargs, documents
        if not isinstance(context, (list, tuple)) or not all(isinstance(d, (Document, str)) for d in context):
            raise TypeError(
                f"the {self.context_key!r} input must be a str or a list of Documents or str, got "
                f"{type(context).__name__}"
            )
        documents = [d.page_content if isinstance(d, Document) else d for d in context]
        return {**kwargs, self.context_key: self.document_separator.join(documents)}, [
            d for d in documents if d.strip()
        ]


def tagged_inputs(messages: list[BaseMessage]) -> dict[str, Any]:
    """The question and documents a `DistillPrompt` tagged onto `messages` (the last tag wins), or {}."""
    for message in reversed(messages):
        tag = message.additional_kwargs.get(TAG)
        if isinstance(tag, dict):
            return tag
    return {}
