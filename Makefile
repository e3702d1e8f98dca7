# The two entry points of the README. Each creates .venv and installs what it needs
# (CPU torch, triton, the compiled extension) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

.PHONY: demo test bench install cuda-compile-check cuda-venv cuda-link-check sanitize bench-baseline \
	bench-compare gpu-check wheel-check

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES) Makefile  # Makefile: its package list
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" "triton>=3.2" numpy pyyaml tqdm pytest pytest-benchmark ruff ninja setuptools wheel transformers tensorboard
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

# The main job: generate the synthetic dataset if absent, train CHAN's similarity on it,
# print the recall table.
demo: install
	$(VENV)/bin/fastalign demo

bench: install
	$(PY) benchmarks/bench_region_word.py
	$(PY) benchmarks/bench_eval.py

# The kernel suite under pytest-benchmark (benchmarks/test_kernels.py, a few minutes on 2 cores).
# bench-baseline saves a run as BENCH_BASELINE; bench-compare times the working tree against it
# and fails when a case's median is more than BENCH_FAIL slower. Load on a shared machine moves
# medians by more than that: compare on a quiet machine, or baseline and compare back to back.
# BENCH_ENV holds both sides still: one thread (two threads that wait for each other swing
# medians on a busy machine) and a fixed glibc mmap threshold (the dynamic one depends on what
# the process allocated before, and a kernel whose N x N buffers land in fresh pages pays their
# page faults on every call: one sparse_spatial forward measured 32 or 38 ms by that alone).
BENCH_BASELINE ?= benchmarks/results/baseline.json
BENCH_FAIL ?= median:25%
BENCH_ENV ?= OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=268435456
bench-baseline: install
	$(BENCH_ENV) $(PY) -m pytest benchmarks --benchmark-only --benchmark-json=$(BENCH_BASELINE)

bench-compare: install
	$(BENCH_ENV) $(PY) -m pytest benchmarks --benchmark-only \
		--benchmark-compare=$(BENCH_BASELINE) --benchmark-compare-fail=$(BENCH_FAIL)

# Everything that needs an NVIDIA GPU, from a clean checkout in under 8 minutes (builds its own
# environment: see benchmarks/gpu_check.py); results in gpu-results/<time>/. Without a GPU it
# says so and exits 0 at once.
gpu-check:
	python3 benchmarks/gpu_check.py

# The suite holds the ahead-of-time checks (tests/test_triton_compile.py and
# tests/test_cuda_compile_check.py compile every Triton and CUDA kernel for sm_80 and sm_90);
# their tables: python -m fastalign.kernels.triton.compile_check, make cuda-compile-check.
test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	CUDA_HOME=$(CUDA_HOME) $(PY) -m pytest -q --durations=15

# The package as a user gets it: the wheel built, installed into a fresh virtual environment,
# and the command line run from another folder (its help, the method list, one tiny training
# on the bundled demo config). The wheel builds from the objects that make install compiled
# (setup.py keeps them in build/temp.*): ninja recompiles only what changed since, and _C is
# linked afresh (build/lib.* goes first: setuptools skips the link when its _C is newer than the
# .cpp files, whatever the headers say). This saves a whole second compile of the extension.
WHEEL_DIR = build/wheel-check
wheel-check: install
	rm -rf $(WHEEL_DIR) build/lib.* && mkdir -p $(WHEEL_DIR)/elsewhere
	MAX_JOBS=2 $(PY) -m pip wheel -q --no-build-isolation --no-deps -w $(WHEEL_DIR)/dist .
	python3 -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/pip install -q "$(TORCH)" $(WHEEL_DIR)/dist/fastalign-*.whl
	cd $(WHEEL_DIR)/elsewhere && ../venv/bin/fastalign --help > /dev/null
	cd $(WHEEL_DIR)/elsewhere && ../venv/bin/fastalign list
	cd $(WHEEL_DIR)/elsewhere && ../venv/bin/fastalign train --config demo_synthetic \
		--no-progress epochs=1 max_val_images=20 output_dir=run

# nvcc (CUDA_HOME) on every CUDA kernel for sm_80 and sm_90: registers, smem, spills, mma.
CUDA_HOME ?= /usr/local/cuda-13.0
cuda-compile-check: install
	CUDA_HOME=$(CUDA_HOME) $(PY) -m fastalign.kernels.cuda_compile_check

# The whole extension built with its CUDA kernels against a CUDA 13 torch (no GPU needed),
# imported, and a CUDA kernel found under the CUDA dispatch key for every compiled op. It
# builds from a copy of the sources in build/cuda-link-check, so that its objects and _C module
# never mix with the CPU build's in this tree. One architecture (sm_80): what this adds to the
# compile check, which covers sm_80 and sm_90, is the torch-side code and the link, so it builds
# at -O0 (FASTALIGN_LINK_ONLY=1, setup.py): the kernels' code generation at -O3 is that check's.
CUDA_VENV ?= .venv-cuda
CUDA_VENV_ABS = $(abspath $(CUDA_VENV))
CUDA_TORCH ?= torch==2.14.1
CUDA_SRC = build/cuda-link-check
# cuda-venv: the CUDA torch and the build tools (about 5.5 GB unpacked; .ci/run installs it
# beside the test suite, as it is mostly disk writes).
cuda-venv: $(CUDA_VENV)/.installed

$(CUDA_VENV)/.installed: Makefile
	test -x $(CUDA_VENV)/bin/python || python3 -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH)" numpy setuptools wheel ninja
	touch $@

cuda-link-check: cuda-venv
	rm -rf $(CUDA_SRC) && mkdir -p $(CUDA_SRC)
	tar -c --exclude=./.venv --exclude=./.venv-cuda --exclude=./build --exclude=./.data \
		--exclude=./runs --exclude='*.so' --exclude=.git . | tar -x -C $(CUDA_SRC)
	cd $(CUDA_SRC) && CUDA_HOME=$(CUDA_HOME) FASTALIGN_FORCE_CUDA=1 FASTALIGN_LINK_ONLY=1 \
		TORCH_CUDA_ARCH_LIST="8.0" $(CUDA_VENV_ABS)/bin/python -m pip install -q \
		--no-build-isolation .
	cd /tmp && $(CUDA_VENV_ABS)/bin/python -m fastalign.kernels.cuda_link_check

# The CPU operator tests against the C++ extension built with AddressSanitizer and UBSan
# (FASTALIGN_SANITIZE=1): an out-of-bounds access or undefined behaviour in a kernel fails the
# run. It builds from a copy of the sources in build/sanitize, so that its objects and _C module
# never mix with the normal build's. Python itself is not instrumented, so gcc's libasan is
# preloaded, with libstdc++ (ASan finds __cxa_throw there only if it is loaded first), and leak
# detection is off (the interpreter keeps its memory by design). The Triton
# tests of these files are deselected (the interpreter is slow under ASan, and runs no C++).
SANITIZE_SRC = build/sanitize
SANITIZE_TESTS = tests/test_op_entry_points.py tests/test_region_word.py \
	tests/test_dimension_correlation.py tests/test_sparse_spatial.py tests/test_prototypes.py
sanitize: install
	rm -rf $(SANITIZE_SRC) && mkdir -p $(SANITIZE_SRC)
	tar -c --exclude=./.venv --exclude=./.venv-cuda --exclude=./build --exclude=./.data \
		--exclude=./runs --exclude='*.so' --exclude=.git . | tar -x -C $(SANITIZE_SRC)
	cd $(SANITIZE_SRC) && FASTALIGN_SANITIZE=1 MAX_JOBS=2 $(abspath $(PY)) setup.py -q \
		build_ext --inplace
	cd $(SANITIZE_SRC) && PYTHONPATH=. \
		LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
		$(abspath $(PY)) -m pytest -q -p no:cacheprovider -k "not triton" $(SANITIZE_TESTS)
