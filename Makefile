# Two commands for a fresh machine: `make run` (set up + the main job, the +exp=dhr chain; `make run EXP=stylegan`
# trains stage 0) and `make test` (set up + tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_SILENT := true
EXP ?= dhr
ARGS ?=

.PHONY: setup run test test-slow test-all benchmark clean-env

$(VENV)/.installed: setup.cfg constraints.txt tools/tv_cpu_shim.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=24" -q
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test,slurm]"
	$(PY) tools/install_tv_shim.py
	$(PY) -c "import torch, torchvision, torchmetrics, pytorch_lightning, lpips, hydra, wandb, albumentations; print('environment ok: torch', torch.__version__)"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) experiments/run.py +exp=$(EXP) $(ARGS)

test: setup
	$(PY) -m pytest -m "not slow" $(ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(ARGS)

test-all: setup
	$(PY) -m pytest $(ARGS)

benchmark: setup
	$(PY) experiments/benchmark_generator.py $(ARGS)

clean-env:
	rm -rf $(VENV)
