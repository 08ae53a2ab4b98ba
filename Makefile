# make demo  — build a tiny random model, start a local swarm, generate through it
# make test  — lint, type-check, install the Debian tools the tests drive (if missing), run the tests
# make bench — run the benchmarks under bench/
# make proto — regenerate swarm/_proto from proto/swarm/v1
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench proto clean system-deps

# The venv is (re)built when pyproject.toml changes. torch is installed first and
# pinned: a CPU build of 2.13.0 is on these machines, while an unpinned `torch`
# would pull several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m swarm.demo

# mypy cannot follow setuptools' package-dir mapping (node/ -> swarm.node), so it checks a
# tree of symlinks laid out as the installed package is.
TYPECHECK := build/typecheck
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/swarm
	for f in swarm/*; do ln -s "$$PWD/$$f" $(TYPECHECK)/swarm/; done
	ln -s "$$PWD/node" $(TYPECHECK)/swarm/node && ln -s "$$PWD/coordinator" $(TYPECHECK)/swarm/coordinator
	MYPYPATH=$(TYPECHECK) $(VENV)/bin/mypy $(TYPECHECK)/swarm tests bench

# Debian's prometheus and chromium, which the status page and Prometheus tests drive for real;
# installed with apt only where missing (CI runs as root).
system-deps:
	bash scripts/system-deps.sh

test: lint system-deps
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) bench/codecs.py

proto: $(STAMP)
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
