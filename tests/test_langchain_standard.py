"""LangChain's standard chat-model suites (langchain-tests) for ChatPromptDistill on the embedded default model.

Tool calling, tool choice, structured output and JSON mode are on (`bind_tools` and `with_structured_output` are
overridden; `supports_json_mode` is set); multimodal input is off (the `supports_*` input flags default to False).
Standard tests still skipped or marked xfail say why where they are overridden below.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from pd_integrations.langchain import ChatPromptDistill
from pd_integrations.loading import default_model_path

# Standard tests whose output is a tool call or a structured object that must fit whole (finish_reason "length"
# raises) get more tokens than the short free-text answers the others need (the xfailed ones below fail either way).
_STRUCTURED_TESTS = ("tool", "few_shot")
# The suites' structured-output prompt is "Tell me a joke about cats." with no word of JSON: the greedy 135M default
# model, held to the schema, repeats a phrase inside the joke's first string until max_tokens, which the adapter
# reports as it should (OutputParserException: cut off at max_tokens). tests/test_structured.py covers the same
# calls on prompts the model can finish.
_JOKE_LOOPS = pytest.mark.xfail(
    raises=OutputParserException,
    reason="the 135M model loops inside the joke string "
    "until max_tokens; the cut-off raises OutputParserException as designed",
)


class PromptDistillStandardParams:
    @property
    def chat_model_class(self) -> type[ChatPromptDistill]:
        return ChatPromptDistill

    @property
    def standard_chat_model_params(self) -> dict:
        # Short answers keep the suite fast; the standard prompts ("Hello", "Write me 2 haikus") need no more.
        # Set here rather than in `chat_model_params`, which test_standard_params combines with its own max_tokens.
        return {**super().standard_chat_model_params, "max_tokens": 16}

    @property
    def model_override_value(self) -> str:
        # A per-call `model=` loads another model; the default model's converted checkpoint directory is one.
        return str(default_model_path())

    @property
    def supports_json_mode(self) -> bool:
        return True

    @pytest.fixture
    def model(self, request: Any) -> ChatPromptDistill:
        params = {
            **self.standard_chat_model_params,
            **self.chat_model_params,
            **(getattr(request, "param", None) or {}),
        }
        if any(word in request.node.name for word in _STRUCTURED_TESTS):
            params["max_tokens"] = 96
        return self.chat_model_class(**params)


class TestChatPromptDistillStandardUnit(PromptDistillStandardParams, ChatModelUnitTests):
    pass


class TestChatPromptDistillStandardIntegration(PromptDistillStandardParams, ChatModelIntegrationTests):
    @_JOKE_LOOPS
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(self, model, schema_type) -> None:
        super().test_structured_output(model, schema_type)

    @_JOKE_LOOPS
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(self, model, schema_type) -> None:
        await super().test_structured_output_async(model, schema_type)

    @_JOKE_LOOPS
    def test_structured_output_pydantic_2_v1(self, model) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @_JOKE_LOOPS
    def test_structured_output_optional_param(self, model) -> None:
        super().test_structured_output_optional_param(model)

    # With tool_choice="auto" the model chooses; asked about the weather, the 135M model answers in prose instead of
    # calling get_weather (forced calls pass: test_tool_calling, test_tool_choice).
    @pytest.mark.xfail(
        raises=AssertionError,
        reason="with tool_choice='auto' the 135M model answers in text rather than calling the tool",
    )
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)

    # JSON mode constrains the reply to an object, not to keys: asked for "setup" and "punchline", the 135M model
    # writes only "setup", so validating the Joke fails (the object itself parses).
    @pytest.mark.xfail(
        raises=OutputParserException, reason="JSON mode does not force keys; the 135M model omits 'punchline'"
    )
    def test_json_mode(self, model) -> None:
        super().test_json_mode(model)
