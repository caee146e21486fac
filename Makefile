# One-command set-up and checks. Every target creates/reuses .venv on its own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint bench demo demo-multilabel serve clean

venv: $(STAMP)

# Reinstall only when a requirements, constraints or pyproject file changed (a second run reuses the venv).
# Every requirements*.txt is installed: the core (requirements.txt), the tests' tools (-dev) and the optional runtimes
# (-serve: the web service, -retrieval: Faiss search, -deploy: ONNX export and onnxruntime), all pinned by constraints.txt.
REQUIREMENTS := $(sort $(wildcard requirements*.txt))
$(STAMP): $(REQUIREMENTS) constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(addprefix -r ,$(REQUIREMENTS)) -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

# One pytest worker per core (at most 4), each single-threaded; a test file stays on one worker (its fixtures once).
test: lint
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile tests

# The whole workflow on a generated dataset (about 5 minutes on a 2-core CPU; a GPU is used when present).
demo: $(STAMP)
	$(PY) tools/run_demo.py --work-dir demo_run

demo-multilabel: $(STAMP)
	$(PY) tools/run_demo.py --work-dir demo_run --multilabel

# The web service and its page on a model folder (default: the one `make demo` trains), http://127.0.0.1:8000/
MODEL ?= demo_run/model
serve: $(STAMP)
	@test -d $(MODEL) || { echo "error: no model folder $(MODEL); run 'make demo' first or pass MODEL=path/to/model"; exit 2; }
	$(PY) serve.py --checkpoint $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache

# The performance targets (bench/results.md), then style search at scale (docs/galleries.md): 1M generated
# 512-value vectors, IVF vs exact Faiss search (about 2 minutes and 5 GiB peak on 2 cores).
bench: $(STAMP)
	$(PY) bench/run_bench.py --output bench/results.md
	$(PY) bench/bench_search.py
