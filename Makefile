# The two entry points of the README. Each creates .venv and installs what it needs
# (CPU torch, triton, the compiled extension) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

.PHONY: demo test bench install

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" "triton>=3.2" numpy pyyaml tqdm pytest ruff ninja setuptools wheel transformers tensorboard
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

# The main job: generate the synthetic dataset if absent, train CHAN's similarity on it,
# print the recall table.
demo: install
	$(VENV)/bin/fastalign demo

bench: install
	$(PY) benchmarks/bench_region_word.py
	$(PY) benchmarks/bench_eval.py

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m fastalign.kernels.triton.compile_check
	$(PY) -m pytest -q
