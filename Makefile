# pptk: `make demo` trains the embedded default, `make test` runs the suite. Each sets itself up first.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PIN := $(shell grep -E '^torch==' constraints.txt)

# CPU-only defaults for this machine and CI; a GPU machine overrides DS_ACCELERATOR by leaving it unset.
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-unit test-dist bench bench-gpu lint lock clean

install: $(VENV)/.installed

# torch goes first by its exact pin: any looser spec pulls the multi-GB CUDA wheels.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip check
	touch $@

demo: install
	$(VENV)/bin/deepspeed --num_gpus 2 recipes/gpt_pretrain.py --demo --output-dir runs/demo

test: install
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=25 tests/unit tests/distributed

test-unit: install
	$(PY) -m pytest -q tests/unit

test-dist: install
	$(PY) -m pytest -q tests/distributed


bench: install
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/memory.py --pp 2 --tp 2 --output benchmarks/results/memory_tp2.json
	$(PY) benchmarks/plan_memory.py
	$(PY) benchmarks/vocab_memory.py
	$(PY) benchmarks/failure_exit.py

# On a GPU machine: pptk's pipeline vs Hugging Face under ZeRO-1 on every GPU it finds (benchmarks/gpu_bench.py);
# the CPU default above is removed so DeepSpeed picks CUDA.
bench-gpu: install
	env -u DS_ACCELERATOR $(PY) benchmarks/gpu_bench.py $(BENCH_ARGS)

# ruff (lint + format check) over the repository, mypy over pptk/, hadolint over the Dockerfile.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q tests/unit/test_docker.py

# Re-resolve the stack after editing pyproject.toml; review the diff of constraints.txt before committing.
lock:
	rm -rf /tmp/pptk-lock && $(PYTHON) -m venv /tmp/pptk-lock
	/tmp/pptk-lock/bin/pip install -q "$(TORCH_PIN)" && /tmp/pptk-lock/bin/pip install -q -e ".[dev]"
	{ sed -n '/^#/p' constraints.txt; /tmp/pptk-lock/bin/pip freeze --exclude-editable | sed 's/+cpu//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
