# columnhub: the two set-up commands of the README, and helpers.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test install install-test system-deps triton-venv bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(PY)
	$(PIP) install -q -e '.[all]'
	@# what pip does for a regular install; an editable one compiles on first import,
	@# never where PYTHONDONTWRITEBYTECODE=1 (each command would compile its sources)
	$(PY) -m compileall -q src/columnhub

## Main job: install everything, deliver examples/demo.yaml on ../shared/data.
demo: install
	$(VENV)/bin/columnhub deliver examples/demo.yaml -o demo-output

## Test suite: install test dependencies and real servers, run every test.
install-test: install system-deps triton-venv
	$(PIP) install -q --group test -e '.[all]'

system-deps:
	bash scripts/install-system-deps.sh

triton-venv:
	bash scripts/setup-triton-venv.sh

test: install-test
	$(PY) -m pytest

bench: install-test
	$(PIP) install -q --group bench coffea
	$(PY) benchmarks/run_all.py

clean:
	rm -rf demo-output .pytest_cache .hypothesis
