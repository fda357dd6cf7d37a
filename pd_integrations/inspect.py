"""What PromptDistill kept, in terms a RAG user reads: retrieved documents and their retention."""

from __future__ import annotations


def document_retention(prompt_text: str, kept_char_spans: list[tuple[int, int]],
                       documents: list[str]) -> list[float | None]:
    """Share of each document's characters that lie in kept spans of the rendered prompt.

    Each document is located in `prompt_text` (its last occurrence); a document not found verbatim gets `None`.
    """
    shares: list[float | None] = []
    for document in documents:
        text = document.strip()
        start = prompt_text.rfind(text) if text else -1
        if start < 0:
            shares.append(None)
            continue
        end = start + len(text)
        kept = sum(max(0, min(end, b) - max(start, a)) for a, b in kept_char_spans)
        shares.append(kept / len(text))
    return shares
