# Two commands: `make train` (SimCLR on the bundled demo data) and `make test`.
# Both create .venv and install scaleclr with its extras when missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.scaleclr-installed
# Several torch processes on few cores: no OpenMP spin-waiting.
export OMP_WAIT_POLICY ?= PASSIVE
ARGS ?=

.PHONY: train test test-all setup clean

setup: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[deepspeed,dev]"
	@touch $(STAMP)

train: $(STAMP)
	$(PY) train.py config=quickstart $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
