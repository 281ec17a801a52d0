# Developer entry points. `make test` works from a fresh clone: it creates .venv,
# installs the package with every extra, then runs the linters and the tests.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A plain `torch` spec can pull a multi-GB CUDA build; this pin installs the CPU build.
TORCH_SPEC := torch==2.13.0

.PHONY: install test demo bench bench-search bench-scaling bench-lockstep bench-predictive bench-objective docs clean

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
	$(VPY) -m pytest -q -n auto

demo: $(STAMP)
	$(VPY) -m tvm_cim.workflows.demo

bench: $(STAMP)
	$(VPY) bench/run_all.py

# Every search strategy on mnist1d-resnet and digits-cnn, three seeds, confirmed on the
# test split: about 30 minutes per deep-model search on two cores.
bench-search: $(STAMP)
	$(VPY) bench/search.py

# Episodes per minute in process and on 1 and 2 Dask workers, three repeats each.
bench-scaling: $(STAMP)
	$(VPY) bench/scaling.py

# DQN and DDPG playing one episode at a time against two in lockstep, six seeds each.
bench-lockstep: $(STAMP)
	$(VPY) bench/lockstep.py

# Rank correlation of the short policy evaluation with the final finetune: about 6 minutes.
bench-predictive: $(STAMP)
	OMP_NUM_THREADS=1 $(VPY) bench/predictive.py

# DQN on a 16-crossbar chip, minimizing the scheduled makespan or the sequential sum:
# six digits-cnn searches, about 5 minutes each.
bench-objective: $(STAMP)
	$(VPY) bench/objective.py

docs: $(STAMP)
	$(VPY) -m tvm_cim.sim.isa_doc docs/isa.md

clean:
	rm -rf $(VENV) build *.egg-info sim/_core.c sim/_core*.so sim/_isa.pxi .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
