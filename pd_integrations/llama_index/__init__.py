"""PromptDistill for LlamaIndex: `Settings.llm = PromptDistillLLM()` (or `as_query_engine(llm=...)`) and the
retrieved context is pruned inside the model, seeded by the query engine's question.

`PromptDistillStatsHandler` collects the kept/prompt token statistics of each LLM call made by a query engine.
"""

from .llm import PromptDistillLLM
from .stats import PromptDistillStatsHandler

__all__ = ["PromptDistillLLM", "PromptDistillStatsHandler"]
