"""LangChain's standard chat-model suites (langchain-tests) for ChatPromptDistill on the embedded default model.

Tool calling, structured output and multimodal input are off: ChatPromptDistill overrides neither `bind_tools` nor
`with_structured_output`, and the suites' `supports_*` input flags default to False. Every other standard test runs.
"""

from __future__ import annotations

from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from pd_integrations.langchain import ChatPromptDistill
from pd_integrations.loading import default_model_path

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


class TestChatPromptDistillStandardUnit(PromptDistillStandardParams, ChatModelUnitTests):
    pass


class TestChatPromptDistillStandardIntegration(PromptDistillStandardParams, ChatModelIntegrationTests):
    pass
