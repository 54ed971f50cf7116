# Two entry points: `make demo` and `make test`. Each bootstraps uv when it is missing,
# syncs the locked environment, then runs.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)
export UV_PYTHON_DOWNLOADS ?= never
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
# Idle OpenMP threads sleep instead of spinning: on shared 2-core machines spinning torch
# threads made a ranker epoch 8x slower (rankers/train.py, cpu_threads).
export OMP_WAIT_POLICY ?= PASSIVE
# Python writes each module's bytecode on its first import, so later processes (rank children,
# pytest workers) start from it. This environment sets PYTHONDONTWRITEBYTECODE; compiling the
# whole environment at sync time instead (uv's compile-bytecode, 19,600 files with torch's
# and Prefect's) cost 30 to 50 s of every fresh clone's set-up, for modules the commands never import.
unexport PYTHONDONTWRITEBYTECODE
VENV_PY := $(CURDIR)/.venv/bin/python

.PHONY: demo test sync bench calibration gpu clean

$(CURDIR)/.tools/bin/uv:
	$(PYTHON) -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/python -m pip install --quiet --disable-pip-version-check uv

# After a sync that changed the environment, the bytecode of what the commands import is written
# once, by two processes side by side; otherwise the first test workers and ranking processes
# all compiled the same modules at once (31 s of a fresh clone's suite).
WARM_MARK := $(CURDIR)/.venv/.bytecode-written
sync: $(UV)
	$(UV) sync --locked --python $(PYTHON)
	@if [ ! -f $(WARM_MARK) ] || [ uv.lock -nt $(WARM_MARK) ]; then \
	  $(VENV_PY) -c "import torch, transformers, timm, tokenizers, safetensors, h5py, PIL, extractors.text, extractors.vit, extractors.blip, rankers.nrms, rankers.finetune" & a=$$!; \
	  $(VENV_PY) -c "import prefect, prefect.server.api.server, uvicorn, dask.distributed, lightgbm, sklearn, scipy.stats, matplotlib.figure, hypothesis, flows.compare, flows.extract, flows.rank, runs.isolated" & b=$$!; \
	  wait $$a && wait $$b && touch $(WARM_MARK); \
	fi

WORLD := storage/data/synthetic-small-seed0
# The arms of the two questions (does having a cover help? does its content help beyond that?).
# flows.compare's default grid adds image-only and BLIP arms: 7 min on 2 cores, over the demo's
# 6-minute budget (their 6 NRMS runs alone are 140 CPU s).
DEMO_SOURCES := text,text+cover,hadamard

demo: sync
	$(VENV_PY) -m storage.synthetic --scale small --seed 0 --out $(WORLD)
	$(VENV_PY) -m storage.mind validate $(WORLD)
	$(VENV_PY) -m flows.compare --data $(WORLD) --name demo --seeds 3 --sources $(DEMO_SOURCES)

# Both cores: pytest-xdist, one file per worker at a time (module fixtures are built once).
test: sync
	$(VENV_PY) -m pytest -n auto --dist loadfile

bench: sync
	$(VENV_PY) benchmarks/parse.py
	$(VENV_PY) benchmarks/score.py
	$(VENV_PY) benchmarks/extract.py
	$(VENV_PY) benchmarks/rank_train.py
	$(VENV_PY) benchmarks/lgbm.py
	$(VENV_PY) benchmarks/finetune.py
	$(VENV_PY) benchmarks/store_read.py
	$(VENV_PY) benchmarks/pretrain.py

# Worlds where images carry nothing, only presence, or content (about an hour on 2 cores).
calibration: sync
	$(VENV_PY) benchmarks/calibration.py

# Every GPU figure in one run (about 8 minutes on one H100/H200; needs a CUDA GPU).
gpu: sync
	$(VENV_PY) benchmarks/gpu.py

clean:
	rm -rf storage/data storage/features storage/models storage/reports .pytest_cache
