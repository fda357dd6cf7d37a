"""Every ```python block in README.md and docs/*.md runs, so the docs cannot go stale.

The blocks of one page run in order in one namespace, as a reader would paste them (a later block may use the
names an earlier one defined), against the embedded default model with the docs' own short inputs. A block that
cannot run here (it needs a running server, say) is marked on the line before its fence with
`<!-- docs-test: skip REASON -->`; it is reported as a skipped test with that reason, and
`test_docs_blocks_are_counted` fails if a marker has no reason or the pages hold no block at all.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b\s*(.*?)\s*-->\s*$")


def python_blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of each ```python block of `page`, in order."""
    text = page.read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _SKIP.search(before)
        blocks.append((line, match.group(1), marker.group(1) if marker else None))
    return blocks


BLOCKS = [(page, *block) for page in PAGES for block in python_blocks(page)]
_NAMESPACES: dict[Path, dict] = {}


@pytest.mark.parametrize(
    "page, line, code, skip", BLOCKS, ids=[f"{page.relative_to(ROOT)}:{line}" for page, line, _, _ in BLOCKS]
)
def test_docs_python_block_runs(page, line, code, skip, monkeypatch):
    if skip is not None:
        pytest.skip(f"marked in {page.name}:{line}: {skip}")
    monkeypatch.chdir(ROOT)  # the docs' paths (cookbook/, docs/) are relative to a clone
    namespace = _NAMESPACES.setdefault(page, {"__name__": f"docs_{page.stem}"})
    exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)


def test_docs_blocks_are_counted():
    skipped = [(page.name, line, reason) for page, line, _, reason in BLOCKS if reason is not None]
    assert BLOCKS, "no ```python block found in README.md or docs/"
    assert all(reason for _, _, reason in skipped), f"a docs-test skip marker needs a reason: {skipped}"
    print(
        f"\n{len(BLOCKS)} python blocks in {len(PAGES)} pages: {len(BLOCKS) - len(skipped)} run, "
        f"{len(skipped)} marked not runnable: {skipped}"
    )
