# Developer entry points. `make test` works from a fresh clone: it creates .venv,
# installs the package with every extra, then runs the linters and the tests.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A plain `torch` spec can pull a multi-GB CUDA build; this pin installs the CPU build.
TORCH_SPEC := torch==2.13.0

.PHONY: install test demo bench bench-search docs clean

install: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py pyproject.toml sim/_core.pyx sim/isa.py sim/isa_pxi.py | $(VPY)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install "$(TORCH_SPEC)"
	$(VPY) -m pip install -e ".[all]"
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VPY) tests/import_graph.py check
	$(VPY) -m pytest -q

demo: $(STAMP)
	$(VPY) -m tvm_cim.workflows.demo

bench: $(STAMP)
	$(VPY) bench/run_all.py

# Every search strategy on digits-cnn and mnist1d-cnn, three seeds: about 40 minutes.
bench-search: $(STAMP)
	$(VPY) bench/search.py

docs: $(STAMP)
	$(VPY) -m tvm_cim.sim.isa_doc docs/isa.md

clean:
	rm -rf $(VENV) build *.egg-info sim/_core.c sim/_core*.so sim/_isa.pxi .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
