"""The interpretability views: token mapping, HTML (escaping, structure, and shading as a browser renders it) and
the terminal summary."""

from __future__ import annotations

import dataclasses
import re
import shutil
from html.parser import HTMLParser

import pytest

from pd_integrations import PromptDistillConfig, PromptDistillEngine
from pd_integrations.kept_view import document_retention, render_html, summary, token_view
from pd_integrations.probes import needle_probe

from .conftest import tiny_model

DOCUMENTS = [
    'Alpha <b>bold</b> & "quoted" facts about the vault. ' * 4,
    "Beta notes on the weather in the valley, told twice. " * 4,
]
PRUNING = PromptDistillConfig(
    selection_layers=(1,), budgets=(24,), span="token", pool_kernel=1, aggregation="softmax_mean"
)


@pytest.fixture(scope="module")
def tiny_result(tokenizer):
    engine = PromptDistillEngine(tiny_model("llama"), tokenizer, PRUNING)
    messages = [{"role": "user", "content": "\n\n".join(DOCUMENTS) + "\n\nWhat is in the vault?"}]
    return engine.generate(messages=messages, query="What is in the vault?", documents=DOCUMENTS, max_new_tokens=3)


class SpanCollector(HTMLParser):
    """Collects the prompt's token spans: (classes, data-start, data-end, text)."""

    def __init__(self):
        super().__init__()
        self.spans: list[list] = []
        self._open = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._open = tag == "span" and "data-start" in attrs
        if self._open:
            self.spans.append([attrs["class"].split(), int(attrs["data-start"]), int(attrs["data-end"]), ""])

    def handle_data(self, data):
        if self._open:
            self.spans[-1][3] += data

    def handle_endtag(self, tag):
        self._open = False


def test_token_view_matches_the_result(tiny_result, tokenizer):
    view = token_view(tiny_result, tokenizer)
    assert len(view.offsets) == len(view.kept) == len(view.protected) == tiny_result.prompt_tokens
    assert sum(view.kept) == tiny_result.kept_tokens
    assert sum(view.protected) == tiny_result.protected_tokens
    assert all(kept for kept, protected in zip(view.kept, view.protected) if protected)
    assert min(view.score_percentiles) == 0.0 and max(view.score_percentiles) == 1.0
    with pytest.raises(ValueError, match="re-tokenizes to"):
        token_view(dataclasses.replace(tiny_result, prompt_tokens=tiny_result.prompt_tokens + 5), tokenizer)
    with pytest.raises(ValueError, match="no prompt text"):
        token_view(dataclasses.replace(tiny_result, prompt_text=None), tokenizer)


def test_html_escapes_the_prompt_and_shades_every_token(tiny_result, tokenizer):
    page = render_html(tiny_result, tokenizer, DOCUMENTS)
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    collector = SpanCollector()
    collector.feed(page)
    spans = collector.spans
    text = tiny_result.prompt_text
    # The spans reproduce the prompt text they claim, and their states the protected and kept counts; only
    # retrieved-context tokens carry a score shade.
    assert all(text[start:end] == shown for _, start, end, shown in spans)
    assert "".join(shown for *_, shown in spans) == text
    protected = [classes for classes, *_ in spans if classes[0] == "protected"]
    assert len(protected) == tiny_result.protected_tokens > 0 and all(len(c) == 1 for c in protected)
    assert sum(classes[0] == "kept" for classes, *_ in spans) == tiny_result.kept_prunable_tokens
    assert all(re.fullmatch(r"[kd]\d", classes[1]) for classes, *_ in spans if classes[0] != "protected")
    assert "Documents" in page and page.count("<tr><td>") == len(DOCUMENTS)


def test_full_attention_page_says_nothing_was_selected(tokenizer):
    engine = PromptDistillEngine(tiny_model("llama"), tokenizer, PromptDistillConfig(method="full"))
    result = engine.generate("A short prompt about nothing in particular.", max_new_tokens=2)
    page = render_html(result, tokenizer, title="Full <attention>")
    assert "<title>Full &lt;attention&gt;</title>" in page
    assert "nothing was selected" in page


def test_summary_lists_spans_and_documents(tiny_result):
    text = summary(tiny_result, DOCUMENTS + ["never retrieved"], max_spans=2)
    assert text.startswith(
        f"promptdistill at layers 1: kept {tiny_result.kept_tokens} of {tiny_result.prompt_tokens} prompt tokens"
    )
    shares = document_retention(tiny_result.prompt_text, tiny_result.kept_char_spans, DOCUMENTS)
    assert f"#1 {f'{shares[0]:.0%}':>13}" in text
    assert "#3 not in prompt" in text
    assert f"and {len(tiny_result.kept_char_spans) - 2} more" in text


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@pytest.mark.slow
def test_needle_is_shaded_as_kept_in_chromium(default_model, tmp_path):
    """The real default model prunes ~1k tokens to 256 and keeps the needle; headless Chromium must render every
    needle token with the kept (green) shading and the dropped tokens without it."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")

    model, tokenizer = default_model
    engine = PromptDistillEngine(model, tokenizer, PromptDistillConfig(selection_layers=(14,), budgets=(256,)))
    probe = needle_probe(tokenizer, 1000, 0.5, seed=0)
    result = engine.generate(messages=probe.messages(), query=probe.question, max_new_tokens=4)
    start = result.prompt_text.find(probe.needle)
    end = start + len(probe.needle)
    assert result.kept_tokens < result.prompt_tokens / 2
    assert any(a <= start and end <= b for a, b in result.kept_char_spans), "selection dropped the needle"
    page = tmp_path / "kept.html"
    page.write_text(render_html(result, tokenizer, [probe.context]), encoding="utf-8")

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        browser.get(page.as_uri())
        styles = browser.execute_script(
            """const [start, end] = arguments;
            return [...document.querySelectorAll('.prompt span[data-start]')].map(span => ({
                needle: +span.dataset.start < end && +span.dataset.end > start,
                kept: span.classList.contains('kept'),
                background: getComputedStyle(span).backgroundColor}));""",
            start,
            end,
        )
    finally:
        browser.quit()
    needle = [s for s in styles if s["needle"]]
    assert needle and all(s["kept"] and is_green(s["background"]) for s in needle)
    assert not any(is_green(s["background"]) for s in styles if not s["kept"])


def is_green(css_color: str) -> bool:
    """Whether a computed `rgb(...)`/`rgba(...)` background is visibly green."""
    red, green, blue, *alpha = (float(v) for v in re.findall(r"[\d.]+", css_color))
    return (alpha[0] if alpha else 1.0) > 0.05 and green > red and green > blue
