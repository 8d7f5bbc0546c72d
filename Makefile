# bnbook: every command a reader or CI needs. `make book` and `make test` do
# all set-up on a fresh machine (a virtual environment in .venv with the
# pinned set from requirements-lock.txt); re-running them reinstalls nothing
# unless the lock file or pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# One thread per process: the notebooks' printed numbers must not depend on
# how many cores a reader has (reduction order changes the last bits).
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
# The same code paths on every x86-64 CPU with AVX2: the stored outputs were
# made on one CPU and must come out again, digit for digit, on another (one
# with AVX-512 picks other kernels, whose sums round differently, and a
# training run then ends elsewhere). ATen's vectorized ops, MKL's BLAS (its
# "conditional numerical reproducibility" mode), oneDNN's convolutions and
# NumPy's OpenBLAS are each pinned to their AVX2 code. Across vendors (an Intel
# Xeon and an AMD EPYC) some last bits still differ; the few cells that
# print a chaotic training run's numbers are tagged nbval-ignore-output and
# checked by an assert (CONTRIBUTING.md, "A chapter").
export ATEN_CPU_CAPABILITY ?= avx2
export MKL_CBWR ?= AVX2,STRICT
export ONEDNN_MAX_CPU_ISA ?= AVX2
export OPENBLAS_CORETYPE ?= Haswell
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# The same pins in the kernel's own environment (its kernel.json), so that a
# chapter opened in Jupyter by hand, or in an editor that uses this .venv's
# kernel, runs as `make` runs it: without them, on a CPU with AVX-512, torch
# and oneDNN pick other kernels, training runs end elsewhere, and checks in
# chapters 6 to 9 fail (measured on an AMD EPYC).
PINNED := OMP_NUM_THREADS MKL_NUM_THREADS ATEN_CPU_CAPABILITY MKL_CBWR ONEDNN_MAX_CPU_ISA OPENBLAS_CORETYPE
KERNEL_ENV := $(foreach v,$(PINNED),--env $(v) $($(v)))

.PHONY: help setup book test test-unit test-notebooks execute bench lab clean

help:
	@echo "make book   build the HTML book in _build/html (executes every chapter fresh)"
	@echo "make test   run every test: bnlib unit/property tests, nbval on the chapters, the book build and a browser check"
	@echo "make bench  time bnlib against torch's native batch norm (and layer, group, instance norm)"
	@echo "make lab    open the chapters in JupyterLab from the project's environment"
	@echo "make execute  re-execute every chapter in place (after a change to bnlib)"
	@echo "make test-unit        only bnlib's pytest suite"
	@echo "make test-notebooks   only nbval on the chapters"
	@echo "make setup  only the .venv with the pinned set;  make clean  remove the build"

setup: $(STAMP)

# pip byte-compiles every package as it installs it (about half of a fresh
# install's time): keep it. With --no-compile, Python compiles the modules a
# run imports when it first imports them, and where PYTHONDONTWRITEBYTECODE
# is set (as on the project's machines) it does so again in every process:
# each kernel and each worker then spends seconds compiling torch, and make
# test took minutes longer.
$(STAMP): requirements-lock.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-lock.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 $(KERNEL_ENV) >/dev/null
	$(PY) -m bnlib.cpu_kernels
	@touch $(STAMP)

# The chapters are executed fresh, $(BOOK_JOBS) at a time, into an empty
# jupyter-cache; the build then reads them from it (see `execute:` in
# _config.yml). One at a time, as Jupyter Book does, takes twice as long.
BOOK_JOBS ?= 2
book: $(STAMP)
	rm -rf _build/html _build/.doctrees _build/jupyter_execute _build/.jupyter_cache
	$(PY) tools/execute_chapters.py --jobs $(BOOK_JOBS) --cache _build/.jupyter_cache chapters/*.ipynb
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	@echo
	@echo "The book is built: open $(CURDIR)/_build/html/index.html"

# Every chapter is executed once, by nbval, in $(TEST_WORKERS) processes
# (pytest-xdist; one thread each, as above): --dist loadscope keeps every
# notebook's cells, and every test module, in one process, in order;
# --no-loadscope-reorder keeps the order tests/conftest.py gives them (the
# slowest first, so that both processes finish near the same time).
# tools/nbval_store.py keeps each chapter's fresh outputs; the book is built
# from them (the outputs the tests just checked, figures included), and the
# browser test then reads the HTML in _build/html. Executing the chapters
# for the build as well would take as long again.
# The unit tests fill the cores in two parts. $(TEST_FIRST), the longest
# (Triton's interpreter, about three minutes in one process), runs in the
# chapters' pool, where it keeps a core busy while the other finishes the
# last chapters. The rest, in one process, runs beside the book build and
# the browser test, which use about one core: their output is kept in
# $(BOOK_LOG) and printed after the unit tests'.
TEST_WORKERS ?= 2
PARALLEL := -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg
BOOK_LOG := _build/book-and-browser.log
TEST_FIRST := tests/test_triton.py
test: $(STAMP)
	rm -rf _build/html _build/.doctrees _build/jupyter_execute _build/.jupyter_cache _build/nbval $(BOOK_LOG)
	$(PY) -m pytest -q -p no:cacheprovider $(PARALLEL) $(NBVAL) -p tools.nbval_store --nbval-store _build/nbval chapters $(TEST_FIRST)
	$(PY) tools/execute_chapters.py --from _build/nbval --cache _build/.jupyter_cache chapters/*.ipynb
	@echo "The book build and the browser test run beside the other unit tests; their output follows."
	{ $(VENV)/bin/jupyter-book build . -W -n --keep-going \
	  && $(PY) -m pytest -q -p no:cacheprovider -m browser tests; } > $(BOOK_LOG) 2>&1 & book=$$!; \
	$(PY) -m pytest -q -p no:cacheprovider -m "not browser" $(addprefix --ignore=,$(TEST_FIRST)) tests; unit=$$?; \
	wait $$book; built=$$?; \
	echo "--- the book build and the browser test ($(BOOK_LOG)):"; cat $(BOOK_LOG); \
	echo "unit tests: exit $$unit; book build and browser test: exit $$built"; \
	test $$unit -eq 0 && test $$built -eq 0

test-unit: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PARALLEL) tests -m "not browser"

test-notebooks: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PARALLEL) $(NBVAL) chapters

# Re-execute every chapter in place, storing fresh outputs. Run it after a
# change to bnlib that moves any printed digit, then `make test-notebooks`.
execute: $(STAMP)
	$(PY) tools/execute_chapters.py --jobs $(BOOK_JOBS) --inplace chapters/*.ipynb

# CPU: bnlib vs torch native (1 and 2 threads), SyncBN vs local BN over
# gloo processes, and the Triton kernels' host work per call. On a machine with CUDA and Triton, also the GPU table,
# written to bench/results/ (commit it, labelled with device and versions).
bench: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) bench/bench_batchnorm.py --threads 1 2 --clock thread --pin-malloc
	OMP_NUM_THREADS=2 $(PY) bench/bench_norms.py --threads 1 2 --clock thread --pin-malloc
	$(PY) bench/bench_sync.py --processes 2 4
	$(PY) bench/bench_triton_host.py --commit b19d0fe --runs 3
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(PY) bench/bench_gpu.py --out bench/results; \
	else echo "No CUDA GPU here: the GPU table is the committed bench/results/gpu_h100.md"; fi

lab: $(STAMP)
	$(VENV)/bin/jupyter lab chapters

clean:
	rm -rf _build .pytest_cache .hypothesis
