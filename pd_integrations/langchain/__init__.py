"""LangChain adapters: PromptDistill prunes retrieved context inside the model while a chain runs.

`ChatPromptDistill` (a `BaseChatModel`) and `PromptDistillLLM` (a `BaseLLM`) are thin adapters over one shared
`PromptDistillEngine` per model and load settings; weights load on the first call. `DistillPrompt` wraps a chain's
prompt template so each input's question and retrieved documents reach `ChatPromptDistill`.
`PromptDistillStatsHandler` records what was kept in each model call of a run, for chains that end in a parser.
"""

from .chat_models import ChatPromptDistill
from .llms import PromptDistillLLM
from .prompts import DistillPrompt
from .stats import PromptDistillStatsHandler

__all__ = ["ChatPromptDistill", "DistillPrompt", "PromptDistillLLM", "PromptDistillStatsHandler"]
