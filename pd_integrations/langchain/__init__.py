"""LangChain adapters: PromptDistill prunes retrieved context inside the model while a chain runs.

`ChatPromptDistill` (a `BaseChatModel`) and `PromptDistillLLM` (a `BaseLLM`) are thin adapters over one shared
`PromptDistillEngine` per model and load settings; weights load on the first call.
"""

from .chat_models import ChatPromptDistill
from .llms import PromptDistillLLM

__all__ = ["ChatPromptDistill", "PromptDistillLLM"]
