"""Tool calling without a framework: OpenAI tool dicts checked, `tool_choice` resolved, the grammar a call's output
options ask for, tool calls and results rendered into chat messages, and streamed output split into text and call
deltas. The LangChain adapter and pd-serve both build on it.

Messages with tools are OpenAI-shaped dicts: an assistant turn may carry
`"tool_calls": [{"id": ..., "type": "function", "function": {"name": ..., "arguments": {...}}}]` (arguments as a
dict, not OpenAI's JSON string: chat templates serialise them), and a tool's result is
`{"role": "tool", "content": ..., "tool_call_id": ...}`.

How tools reach the model (`tool_format`, see `pd_integrations.prompt.render`):
- "template": the model's own chat template renders `tools=`, the calls and the results. Only templates that write
  the Hermes `<tool_call>` format qualify (Qwen2.5, Qwen3 and many fine-tunes), since that is the format the
  grammar constrains and the parser reads; `template_supports_tools` finds them by rendering a probe conversation.
- "builtin": the same Hermes text written by this module, for any template: the tools' signatures appended to the
  system message (`tools_system_prompt`), each call as a `<tool_call>` block in its assistant turn, each result as
  a `<tool_response>` block in a user turn (`builtin_messages`). The default SmolLM2 template needs it.
- "auto" (default): "template" when the template supports it, else "builtin".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .constraints import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    CallDelta,
    Grammar,
    Grammars,
    ToolCallStream,
    ToolSpec,
    parse_tool_calls,
)

__all__ = [
    "RESPONSE_FORMATS",
    "TOOL_CHOICES",
    "TOOL_FORMATS",
    "CallDelta",
    "ToolCallStream",
    "builtin_messages",
    "check_tool_choice",
    "check_tool_format",
    "check_tools",
    "has_tool_messages",
    "output_grammar",
    "resolve_tool_format",
    "template_supports_tools",
    "tool_call_block",
    "tool_response_block",
    "tools_system_prompt",
]

TOOL_FORMATS = ("auto", "template", "builtin")
# tool_choice values besides a tool's name: "auto" lets the model choose between text and calls, "none" hides
# the tools, "any"/"required" (and True, LangChain's "the one bound tool") force a call.
TOOL_CHOICES = ("auto", "none", "any", "required")
RESPONSE_FORMATS = (
    '{"type": "text"}',
    '{"type": "json_object"}',
    '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
)
_NO_PARAMETERS = {"type": "object", "properties": {}}

_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{signatures}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


# ---------------------------------------------------------------- checking a call's options


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """`tools` checked to be OpenAI tool dicts, `{"type": "function", "function": {"name", "description",
    "parameters"}}`, with names and object schemas as parameters. Raises `ValueError` naming `tools[i]`."""
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of OpenAI tool dicts, got {type(tools).__name__}")
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict):
            raise ValueError(
                f'tools[{index}] must be {{"type": "function", "function": {{"name": ..., '
                f'"parameters": {{...}}}}}}, got {tool!r:.120}'
            )
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools[{index}].function.name must be a non-empty str, got {name!r}")
        parameters = function.get("parameters", _NO_PARAMETERS)
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ValueError(
                f"tools[{index}] (tool {name!r}) has parameters that are not a JSON object schema: {parameters!r:.200}"
            )
    return list(tools)


def check_tool_choice(tool_choice: Any, names: Sequence[str]) -> str:
    """`tool_choice` as "auto", "none", "required" or a tool's name. Accepts None ("auto"), "any", True (the one
    tool), a name, and `{"type": "function", "function": {"name": ...}}`; raises `ValueError` naming the value and
    the allowed ones."""
    if tool_choice is None:
        return "auto"
    if tool_choice is True and len(names) == 1:
        return names[0]
    if isinstance(tool_choice, dict):
        tool_choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if tool_choice == "any":
        return "required"
    if isinstance(tool_choice, str) and (tool_choice in TOOL_CHOICES or tool_choice in names):
        return tool_choice
    raise ValueError(
        f"tool_choice must be one of {', '.join(map(repr, TOOL_CHOICES))}, True (with one tool), or "
        f"a given tool's name ({', '.join(map(repr, names)) or 'no tools given'}), got {tool_choice!r}"
    )


def check_tool_format(tool_format: Any) -> str:
    """`tool_format` checked to be one of `TOOL_FORMATS`; raises `ValueError` naming them."""
    if tool_format not in TOOL_FORMATS:
        raise ValueError(f"tool_format must be one of {', '.join(map(repr, TOOL_FORMATS))}, got {tool_format!r}")
    return tool_format


def resolve_tool_format(tokenizer, tool_format: str) -> str:
    """ "template" or "builtin": how `tool_format` renders tools with `tokenizer`'s chat template. Raises
    `ValueError` for an unknown `tool_format`, and for "template" with a template that does not support tools."""
    supported = template_supports_tools(tokenizer) if check_tool_format(tool_format) != "builtin" else False
    if tool_format == "template" and not supported:
        raise ValueError(
            "tool_format='template' but this model's chat template does not support tools (rendering "
            "with tools= does not write them, or not in the <tool_call> format); use "
            "tool_format='builtin' (or 'auto', which falls back to it) for the built-in format"
        )
    return "template" if supported else "builtin"


def output_grammar(
    engine,
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool | None = None,
    response_format: Any = None,
) -> Grammar | None:
    """The grammar for `engine`'s model that a call's output options ask for, or None for free text.

    Tools with a non-text `response_format` and `tool_choice` "auto": the output is calls or one JSON value
    under the format (a forced call has no reply to format). Raises `ValueError` whose message starts with the
    option it is about (`tools[i]`, `tool_choice`, `response_format`, `parallel_tool_calls`), before any model
    work: an uncompilable schema, an unknown `tool_choice`. `ImportError` without xgrammar.
    """
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ValueError(f"parallel_tool_calls must be a bool, got {parallel_tool_calls!r}")
    tools = check_tools(tools) if tools else []
    names = [tool["function"]["name"] for tool in tools]
    choice = check_tool_choice(tool_choice, names)
    if not tools and choice not in ("auto", "none"):
        raise ValueError(f"tool_choice {choice!r} needs tools to choose from; none were given")
    kind = _response_format_kind(response_format)
    calls = bool(tools) and choice != "none"
    reply_schema = None
    if kind != "text":
        spec = response_format.get("json_schema") or {}
        what = f"response_format schema {spec['name']!r}" if spec.get("name") else "response_format schema"
        reply_schema = spec["schema"] if kind == "json_schema" else {"type": "object"}
        reply = Grammars.of(engine).json_schema(reply_schema, what=what if kind == "json_schema" else "JSON mode")
        if not calls:
            return reply
    if not calls:
        return None
    grammars = Grammars.of(engine)
    specs = []
    for index, tool in enumerate(tools):
        function = tool["function"]
        if choice in ("auto", "required") or function["name"] == choice:
            spec = ToolSpec(function["name"], function.get("parameters") or _NO_PARAMETERS)
            # Compiled on its own first (the compiler caches it for the call grammar), so that an error names it.
            grammars.json_schema(spec.parameters, what=f"tools[{index}] (tool {spec.name!r}) parameters")
            specs.append(spec)
    return grammars.tool_calls(
        specs, required=choice != "auto", parallel=bool(parallel_tool_calls), reply_schema=reply_schema
    )


def _response_format_kind(response_format: Any) -> str:
    """ "text", "json_object" or "json_schema" (with a schema dict); raises `ValueError` naming the allowed ones."""
    if response_format is None:
        return "text"
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind in ("text", "json_object"):
        return kind
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            return kind
        raise ValueError(
            f"response_format json_schema needs a JSON schema (a dict) at json_schema.schema, got {spec!r:.200}"
        )
    raise ValueError(f"response_format must be {' or '.join(RESPONSE_FORMATS)}, got {response_format!r:.200}")


# ---------------------------------------------------------------- rendering into messages


def has_tool_messages(messages: Sequence[dict[str, Any]]) -> bool:
    """Whether a conversation holds tool calls or tool results (which a template must know how to render)."""
    return any(message.get("role") == "tool" or message.get("tool_calls") for message in messages)


def tools_system_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """The tools' signatures and the call format, as Qwen2.5's template writes them into the system message."""
    return _TOOLS_PROMPT.format(signatures="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))


def tool_call_block(name: str, arguments: dict[str, Any]) -> str:
    """One call in the Hermes format, as the tool-call grammar makes the model write it."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_BEGIN}\n{call}\n{TOOL_CALL_END}"


def tool_response_block(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def builtin_messages(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
) -> list[dict[str, str]]:
    """`messages` (with tool calls and results) as plain `{"role", "content"}` messages in the built-in format:
    calls as `<tool_call>` blocks after the assistant's text, results as `<tool_response>` blocks in user turns,
    consecutive messages of one role merged (many templates require alternating roles), and with `tools` their
    signatures appended to the system message (one is added first when there is none)."""
    converted: list[dict[str, str]] = []
    for message in messages:
        role, text = message["role"], message["content"]
        if role == "tool":
            role, text = "user", tool_response_block(text)
        elif message.get("tool_calls"):
            blocks = [
                tool_call_block(call["function"]["name"], call["function"]["arguments"])
                for call in message["tool_calls"]
            ]
            text = "\n".join(filter(None, [text, *blocks]))
        if converted and converted[-1]["role"] == role:
            converted[-1]["content"] = "\n\n".join(filter(None, [converted[-1]["content"], text]))
        else:
            converted.append({"role": role, "content": text})
    if tools:
        if not converted or converted[0]["role"] != "system":
            converted.insert(0, {"role": "system", "content": ""})
        converted[0]["content"] = "\n\n".join(filter(None, [converted[0]["content"], tools_system_prompt(tools)]))
    return converted


# A conversation that exercises everything a template must render for tools, with texts to find in its output.
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_lookup",
        "description": "Looks up the probe marker.",
        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
    },
}
_PROBE_MESSAGES = [
    {"role": "user", "content": "Probe question."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_probe", "type": "function", "function": {"name": "probe_lookup", "arguments": {"x": 7}}}
        ],
    },
    {"role": "tool", "content": "Probe result.", "tool_call_id": "call_probe"},
]
_TEMPLATE_SUPPORT: dict[str, bool] = {}


def template_supports_tools(tokenizer) -> bool:
    """Whether `tokenizer`'s chat template renders tools in the Hermes format: given `tools=`, it writes their
    signatures, an earlier call as a `<tool_call>` block and a tool's result. Found once per template by rendering
    a probe conversation (templates without tools support ignore `tools=` or fail on the tool role)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    key = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    if key not in _TEMPLATE_SUPPORT:
        try:
            text = tokenizer.apply_chat_template(
                _PROBE_MESSAGES, tools=[_PROBE_TOOL], tokenize=False, add_generation_prompt=True
            )
        except Exception:  # noqa: BLE001 - a template raises whatever its author chose for roles it does not know
            text = ""
        _TEMPLATE_SUPPORT[key] = (
            "Looks up the probe marker." in text
            and "Probe result." in text
            and ("probe_lookup", {"x": 7}) in [call[1:] for call in parse_tool_calls(text).calls]
        )
    return _TEMPLATE_SUPPORT[key]
