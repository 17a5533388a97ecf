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
	@$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); } \
		|| { rm -rf $(VENV); echo "could not create $(VENV) with $(PYTHON) (needs Python >= 3.10 with venv/ensurepip)"; exit 1; }
	$(PY) -m pip install -q -e ".[deepspeed,dev,slurm]"
	@touch $(STAMP)

train: $(STAMP)
	$(PY) train.py config=quickstart $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
