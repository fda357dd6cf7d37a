"""What every front end (LangChain, LlamaIndex, pd-serve) does to turn its own call into the engine's: the output
options (tools, tool_choice, response_format) as the prompt's tools and the grammar that constrains decoding
(`OutputOptions`), and a resolved call (`CallOptions`: query, documents, `SamplingParams`, config) that opens
the engine's stream. The adapters resolve their keyword arguments into a `CallOptions` with
`DistillSettings.resolve_call`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .inputs import PromptInput, SamplingParams
from .tools import output_grammar

if TYPE_CHECKING:
    from .config import PromptDistillConfig
    from .constraints import Grammar
    from .engine import PromptDistillEngine
    from .results import GenerationStream

OUTPUT_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")


@dataclass(frozen=True)
class OutputOptions:
    """What a call asks its output to be, in OpenAI's terms: `tools` it may (or, by `tool_choice`, must) call,
    several calls per turn or one (`parallel_tool_calls`), and a reply `response_format`."""

    tools: Sequence[dict] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: Any = None

    @classmethod
    def take(cls, kwargs: dict[str, Any]) -> OutputOptions:
        """The output options in a call's `kwargs`, removed from it."""
        return cls(**{name: kwargs.pop(name) for name in OUTPUT_OPTIONS if name in kwargs})

    @property
    def offered_tools(self) -> Sequence[dict] | None:
        """The tools the prompt shows the model: none when `tool_choice` is "none"."""
        return self.tools if self.tools and self.tool_choice != "none" else None

    def grammar(self, engine: PromptDistillEngine) -> Grammar | None:
        """The grammar for `engine`'s model that the options ask for, or None for free text; raises as
        `pd_integrations.tools.output_grammar` does, before any model work."""
        return output_grammar(engine, **dataclasses.asdict(self))


@dataclass(frozen=True)
class CallOptions:
    """One adapter call, resolved: the `query` that seeds selection and the `documents` that are pruned, its
    `sampling`, its `config`, and whether query and documents came from a prompt template (then results report
    `context_source="template"`)."""

    query: str | None
    documents: Any
    sampling: SamplingParams
    config: PromptDistillConfig | None
    from_template: bool = False

    def prompt(self, **fields: Any) -> PromptInput:
        """The call's `PromptInput`: `fields` (the prompt or messages, tools) with its query and documents."""
        return PromptInput(query=self.query, documents=self.documents, **fields)

    def stream(self, engine: PromptDistillEngine, prompt: PromptInput, constraint: Any = None) -> GenerationStream:
        """Open the engine's stream for `prompt` under the call's sampling and `constraint` (a `Grammar` or one
        generation's constraint); arguments are checked now, tokens come as it is iterated."""
        sampling = self.sampling if constraint is None else dataclasses.replace(self.sampling, constraint=constraint)
        stream = engine.stream(prompt, sampling=sampling)
        if self.from_template:
            stream = stream.map_result(lambda result: dataclasses.replace(result, context_source="template"))
        return stream
