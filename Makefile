# chatkit: `make demo` fine-tunes a tiny chat model end to end on CPU; `make test` runs the test suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.chatkit-installed
# Extra index for torch, e.g. https://download.pytorch.org/whl/cu128 for CUDA (see README).
TORCH_INDEX ?=
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install demo demo-dpo test test-fast test-gpu gpu-check bench lint format clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes, so `make install` is quick once done.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

demo: install
	bash tools/demo.sh

# DPO on the demo's model (runs `make demo` first when outputs/demo/hf is missing).
demo-dpo: install
	bash tools/demo_dpo.sh

# Every tier: the fast one, the slow end-to-end runs, and the gpu tier (which skips, saying why,
# without a CUDA device). Plain `pytest` (and `make test-fast`) is the fast tier alone.
test: install
	$(PY) -m pytest -q -m "" tests

test-fast: install
	$(PY) -m pytest -q tests

test-gpu: install
	$(PY) -m pytest -q -m gpu tests

# On a machine with a GPU: environment, the gpu tier, every recipe's tiny variant in fp16/bf16 with
# resume and export, a 2-GPU pipeline, attention and decode figures (bench/gpu_check.sh says more).
gpu-check: install
	bash bench/gpu_check.sh

bench: install
	for b in bench/*.py; do $(PY) $$b --quick || exit 1; done

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf outputs data/demo/files pretrained/tiny/model
