# nova3d — `make help` lists the targets. Everything runs inside .venv, made by `make setup`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.9.30
# The stamp changes whenever the pins change, so `make setup` reinstalls only then.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock 2>/dev/null | sha1sum | cut -c1-12)
EXP ?= tiny
ARGS ?=
DEMO_OUT ?= outputs/demo
DEMO_ARGS ?=
export PYTHONUNBUFFERED := 1

.DEFAULT_GOAL := help
TOY_DATA ?= data/toy
REAL_DATA ?= data/real_meshes
.PHONY: help setup lock test test-fast demo train fuse tensorboard clean setup-slurm slurm-train \
	toy-data toy-vae toy-bench bad-inputs bench-data bench-fusion-real

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv from nothing with the pinned stack (idempotent, fast when done)

$(STAMP): pyproject.toml requirements.lock requirements.overrides
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	$(BIN)/uv pip install --python $(BIN)/python -q -r requirements.lock --override requirements.overrides
	$(BIN)/uv pip install --python $(BIN)/python -q --no-deps -e .
	@rm -f $(VENV)/.installed-* && touch $@

lock: ## re-resolve requirements.lock from pyproject.toml's pins
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --override requirements.overrides -o requirements.lock -q

# As root (CI), `make test` also installs SLURM for the local-cluster tests (tests/test_slurm.py).
IS_ROOT := $(filter 0,$(shell id -u))
test: setup $(if $(IS_ROOT),setup-slurm) ## the CPU test suite (fast + slow tiers; gpu tests skip without CUDA)
	$(BIN)/python -m pytest -m "not gpu" $(ARGS)

test-fast: setup ## only the fast tier
	$(BIN)/python -m pytest -m "not slow and not gpu" $(ARGS)

demo: setup ## one image -> toy model views -> fuse x3 -> eval -> outputs/demo/report.md (<10 min CPU; DEMO_ARGS=--perturbed adds the perturbed-render scenario)
	$(BIN)/python -m data_prep.render_views --procedural --out $(DEMO_OUT)/renders --resolution 256
	$(BIN)/python -m data_prep.write_shards $(DEMO_OUT)/renders --out $(DEMO_OUT)/shards
	$(BIN)/nova3d inspect-shards $(DEMO_OUT)/shards
	$(BIN)/nova3d contact-sheet $(DEMO_OUT)/shards --out $(DEMO_OUT)/contact_sheet.png
	$(BIN)/python -m nova3d.demo --out $(DEMO_OUT) $(DEMO_ARGS)

toy-data: setup ## the toy recipe's data: 1600 toy objects rendered at 64² -> $(TOY_DATA)/shards/{train,val,test} (resumable, ~15 min)
	$(BIN)/python -m data_prep.toy_data --out $(TOY_DATA) $(ARGS)

toy-vae: setup ## train the toy recipe's VAE on $(TOY_DATA) -> runs/autoencoder/toy/local/conditioner/
	$(BIN)/python -m nova3d.train_vae autoencoder/toy $(ARGS)

toy-bench: setup ## score pretrained/toy on the toy test split: generated views + fused meshes vs truth (bench/toy_generation.py)
	$(BIN)/python bench/toy_generation.py --data $(TOY_DATA) $(ARGS)

bench-data: setup ## the real-mesh set of the fusion bench: 10 pybullet_data objects rendered + GT -> $(REAL_DATA) (~3 min, resumable)
	$(BIN)/python -m data_prep.real_meshes --out $(REAL_DATA) $(ARGS)

bench-fusion-real: bench-data ## fusion quality on the real set, clean views (bench/fusion_quality.py --set real; ~50 min on 2 cores)
	$(BIN)/python bench/fusion_quality.py --set real --data $(REAL_DATA) --scenarios clean $(ARGS)

bad-inputs: setup ## run the catalogue of bad inputs against every command: exit, one-line error, nothing lost (bench/bad_inputs.py, ~15 min; ARGS=--quick)
	$(BIN)/python bench/bad_inputs.py $(ARGS)

train: setup ## train an experiment: make train EXP=gta_full ARGS="trainer.max_steps=10" (EXP defaults to tiny)
	$(BIN)/python -m nova3d.train $(EXP) $(ARGS)

fuse: setup ## fuse an object folder into a textured mesh: make fuse VIEWS=DIR [OUT=DIR] [FUSION=fusion/no_conflict] [ARGS="optim.steps=300"]
	@test -n "$(VIEWS)" || { echo "make fuse: set VIEWS=<object folder>, e.g. VIEWS=outputs/demo/renders/mug"; exit 2; }
	$(BIN)/nova3d fuse --views $(VIEWS) --out $(or $(OUT),outputs/fuse/$(notdir $(patsubst %/,%,$(VIEWS)))) \
		--experiment $(or $(FUSION),fusion/default) $(ARGS)

NODES ?= 1
GPUS_PER_NODE ?= 1
SBATCH_ARGS ?=
slurm-train: setup ## sbatch training: make slurm-train EXP=gta_full NODES=2 GPUS_PER_NODE=8 SBATCH_ARGS="--time=24:00:00"
	$(BIN)/python -m nova3d.slurm submit $(EXP) trainer.num_nodes=$(NODES) trainer.devices=$(GPUS_PER_NODE) $(ARGS) \
		--sbatch-args="$(SBATCH_ARGS)"

SLURM_PACKAGES := slurm-wlm munge
setup-slurm: ## (root) install Debian's SLURM + munge for the local test cluster (fast when installed)
	@if command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; then :; \
	elif [ "$$(id -u)" != 0 ]; then echo "setup-slurm: needs root (apt-get install $(SLURM_PACKAGES))" >&2; exit 1; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		$(SLURM_PACKAGES) >/dev/null; fi >/dev/null

tensorboard: setup ## TensorBoard over every run under runs/
	$(BIN)/tensorboard --logdir runs --bind_all

clean: ## remove outputs/ and runs/ (keeps .venv)
	rm -rf outputs runs
