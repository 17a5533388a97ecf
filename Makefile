# Two commands: `make train` (SimCLR on the bundled demo data, then linear evaluation of its trunk) and `make test`.
# Both create .venv and install scaleclr with its extras when missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.scaleclr-installed
# Several torch processes on few cores: no OpenMP spin-waiting.
export OMP_WAIT_POLICY ?= PASSIVE
ARGS ?=
# `make train`: pretraining (ARGS go to it), then the demo's linear evaluation on its final trunk and on the trunk at
# initialisation (each in its own run directory: a finished run is not repeated; delete $(RUN)_linear to evaluate a
# longer pretraining again), then the figures side by side and the run's learning curves ($(RUN)/curves.png).
RUN := runs/quickstart
LINEAR := config=benchmark/linear_image_classification/demo_digits_linear

.PHONY: train test test-all test-isa test-gpu setup clean

setup: $(STAMP)

$(STAMP): setup.py
	@$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); } \
		|| { rm -rf $(VENV); echo "could not create $(VENV) with $(PYTHON) (needs Python >= 3.10 with venv/ensurepip)"; exit 1; }
	$(PY) -m pip install -q -e ".[deepspeed,dev,slurm,plot,webdataset]"
	@touch $(STAMP)

train: $(STAMP)
	$(PY) train.py config=quickstart $(ARGS)
	final=$$($(PY) -m scaleclr.checkpoint $(RUN) --final) && $(PY) train.py $(LINEAR) \
		config.CHECKPOINT.DIR=$(RUN)_linear config.MODEL.WEIGHTS_INIT.PARAMS_FILE=$$final
	$(PY) train.py $(LINEAR) config.CHECKPOINT.DIR=$(RUN)_linear_init
	@$(PY) -m scaleclr.summary $(RUN) --linear $(RUN)_linear --linear-init $(RUN)_linear_init --plot $(RUN)/curves.png

# two pytest-xdist workers, each test file on one worker, the longest files first (tests/conftest.py); the 25
# slowest cases are listed at the end
XDIST := -n 2 --dist loadfile
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" $(XDIST) --durations=25 $(ARGS)

# The GPU pass (tests marked gpu; docs/gpu.md): one process, on the machine's first GPU. Without CUDA every test
# skips (exit 0); pytest's exit 5 (no test selected) counts as success too.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu -p no:cacheprovider $(ARGS); rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

test-all: $(STAMP)
	$(PY) -m pytest -q $(XDIST) $(ARGS)

# Low-precision and distributed tests on older CPU instruction sets (this machine's AVX-512/AMX kernels round
# bf16 and oneDNN results differently): AVX2 through oneDNN and ATen, then ATen's portable kernels.
ISA_TESTS := tests/test_deepspeed_engine.py tests/test_fsdp_engine.py tests/test_train.py tests/test_sync_bn.py \
	tests/test_losses_distributed.py tests/test_streaming_loss.py tests/test_engine_precision.py
test-isa: $(STAMP)
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q -m "not slow" $(XDIST) $(ISA_TESTS) $(ARGS)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -m "not slow" $(XDIST) $(ISA_TESTS) $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
