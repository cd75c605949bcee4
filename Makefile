# npp: one target per stage. Every target runs inside .venv, made by `make setup`.
# Override variables on the command line: `make test PYTEST_ARGS="-k gpt"`.

PYTHON ?= python3
VENV ?= .venv
# Set SYSTEM_SITE=1 to see the interpreter's packages inside the venv, so a
# cluster's CUDA torch (module load / conda) is used instead of the CPU pin.
SYSTEM_SITE ?= 0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.npp-setup-stamp
PYTEST_ARGS ?=
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.DEFAULT_GOAL := help
.PHONY: help setup test test-fast bench gpu-check clean-venv tokenize tokenize-slurm tokenize-finalize toy train train-slurm export ui sample eval eval-ref compare demo demo-compare

# tokenize: `make tokenize DATA=/data/imagenet/train VQ=ckpts/vq_ds16_c2i.pt OUT=shards/in256`
DATA ?= data/imagenet/train
VQ ?= ckpts/vq_ds16_c2i.pt
OUT ?= shards/in256
IMAGE_SIZE ?= 256
VIEWS_FLAGS ?= --views 2
SAMPLES_PER_SHARD ?= 1000
WORKERS ?= 8
ARRAY ?= 0-31%8

# train: `make train SHARDS=shards/in256 RUN=runs/gpt-b-npp MODEL=GPT-B NGPU=8`
SHARDS ?= $(OUT)
RUN ?= runs/npp
MODEL ?= GPT-B
SCHEDULE ?= 4:0.25,2:0.25,1:0.5
EPOCHS ?= 300
GLOBAL_BATCH ?= 256
DS_CONFIG ?= ds_configs/zero2.json
NGPU ?= 1
NODES ?= 1
TRAIN_FLAGS ?=
# extra sbatch flags for the *-slurm targets, e.g. SBATCH_FLAGS="--partition=gpu --account=me"
SBATCH_FLAGS ?=

# sample / eval: `make sample CKPT=runs/gpt-b-npp/model.pt VQ=ckpts/vq_ds16_c2i.pt CFG=2.0`
CKPT ?= $(RUN)/model.pt
SAMPLES ?= $(RUN)/samples
CFG ?= 2.0
PER_CLASS ?= 50
# 0: the largest batch the free GPU memory holds (KV-cache formula, at most 256); 64 on CPU
SAMPLE_BATCH ?= 0
REF ?= ckpts/VIRTUAL_imagenet256_labeled.npz
# `make eval-ref` writes its own file (never over ADM's REF); 50,000 images as ADM's batches
REF_OUT ?= ckpts/ref_$(notdir $(SHARDS)).npz
REF_LIMIT ?= 50000
INCEPTION ?= ckpts/pt_inception-2015-12-05-6726825d.pth
EVAL_FLAGS ?= --inception $(INCEPTION)
# make gpu-check GPU_CHECK_FLAGS="--out figures.jsonl --only train"
GPU_CHECK_FLAGS ?=

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install npp with pinned dependencies (idempotent)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(if $(filter 1,$(SYSTEM_SITE)),--system-site-packages) $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=68" wheel packaging ninja
	@# torch first: keep one that is already importable (a user's CUDA build).
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else $(PIP) install -q "$$(grep -E '^torch==' requirements.txt)"; fi
	@# deepspeed's setup.py imports torch: without isolation it sees ours instead of
	@# downloading a CUDA torch into a build environment.
	$(PIP) install -q --no-build-isolation "$$(grep -E '^deepspeed==' requirements.txt)"
	grep -vE '^(torch|deepspeed)==|^#|^$$' requirements.txt requirements-test.txt | cut -d: -f2 > $(VENV)/.npp-reqs.txt
	$(PIP) install -q -r $(VENV)/.npp-reqs.txt
	$(PIP) install -q --no-deps -e .
	@touch $@

demo: setup  ## the whole pipeline on the built-in toy set, CPU only (about 10 min; reruns reuse what is built)
	$(VENV)/bin/npp demo --out demo_out

demo-compare: setup  ## NTP baseline vs NPP on the toy set: same samples, both evaluated, compared
	$(VENV)/bin/npp demo compare --out demo_out

test: setup  ## run the whole test suite (CPU only, slow integration tests included)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup  ## the suite without the slow integration tests
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup  ## print the benchmark figures (see README)
	$(PY) bench/npp_cost.py
	$(PY) bench/step_overhead.py
	$(PY) bench/tokenize_throughput.py
	$(PY) bench/train_throughput.py
	$(PY) bench/eval_throughput.py

gpu-check: setup  ## one-shot GPU check (bench/gpu_check.py): npp step vs plain PyTorch, MFU, memory, sampling; exits 0 without CUDA
	$(PY) bench/gpu_check.py $(GPU_CHECK_FLAGS)

tokenize: setup  ## images (DATA) -> VQ codes -> shards (OUT) on this machine; reruns resume
	$(VENV)/bin/npp tokenize run --data $(DATA) --vq $(VQ) --out $(OUT) --image-size $(IMAGE_SIZE) \
	  --samples-per-shard $(SAMPLES_PER_SHARD) --workers $(WORKERS) $(VIEWS_FLAGS)

tokenize-slurm: setup  ## the same as a SLURM array job (ARRAY=0-31%8)
	@# SLURM opens --output=logs/... before the job runs: logs/ is in the repository (recreated if deleted)
	mkdir -p logs
	DATA=$(DATA) VQ=$(VQ) OUT=$(OUT) IMAGE_SIZE=$(IMAGE_SIZE) SAMPLES_PER_SHARD=$(SAMPLES_PER_SHARD) \
	  VIEWS_FLAGS="$(VIEWS_FLAGS)" sbatch $(SBATCH_FLAGS) --array=$(ARRAY) slurm/tokenize.sbatch

train: setup  ## train MODEL on SHARDS into RUN on this machine (NGPU processes); reruns resume
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NGPU) -m npp train --shards $(SHARDS) --out $(RUN) \
	  --model $(MODEL) --schedule $(SCHEDULE) --epochs $(EPOCHS) --global-batch $(GLOBAL_BATCH) \
	  --ds-config $(DS_CONFIG) $(TRAIN_FLAGS)

train-slurm: setup  ## the same on NODES nodes with SLURM (preemption: checkpoint + requeue)
	mkdir -p logs
	SHARDS=$(SHARDS) OUT=$(RUN) MODEL=$(MODEL) SCHEDULE=$(SCHEDULE) EPOCHS=$(EPOCHS) GLOBAL_BATCH=$(GLOBAL_BATCH) \
	  DS_CONFIG=$(DS_CONFIG) EXTRA="$(TRAIN_FLAGS)" sbatch $(SBATCH_FLAGS) --nodes=$(NODES) slurm/train.sbatch

export: setup  ## consolidated fp32 checkpoint of RUN (LlamaGen format) at RUN/model.pt
	$(VENV)/bin/npp train export --run $(RUN)

sample: setup  ## class-balanced guided samples of CKPT (NGPU processes) into SAMPLES; reruns resume
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NGPU) -m npp sample --ckpt $(CKPT) --vq $(VQ) \
	  --out $(SAMPLES) --per-class $(PER_CLASS) --cfg-scale $(CFG) --batch $(SAMPLE_BATCH)

eval: setup  ## FID/sFID/IS/precision/recall of SAMPLES against REF, logged into the run of CKPT
	$(VENV)/bin/npp eval --samples "$(SAMPLES)/samples_cfg*.npz" --ref $(REF) --ckpt $(CKPT) $(EVAL_FLAGS)

eval-ref: setup  ## reference statistics (REF_OUT) from REF_LIMIT real images of SHARDS' source, streamed
	$(VENV)/bin/npp eval ref --shards $(SHARDS) --out $(REF_OUT) --limit $(REF_LIMIT) $(EVAL_FLAGS)

compare: setup  ## table + PNG of FID against training FLOPs for every run of the experiment
	$(VENV)/bin/npp compare --out compare

EXPERIMENT ?= npp
ui: setup  ## the MLflow UI on 127.0.0.1:5000 for $(MLFLOW_TRACKING_URI); prints the URL of EXPERIMENT's training runs
	$(VENV)/bin/npp ui --experiment $(EXPERIMENT) --host 127.0.0.1 --port 5000

tokenize-finalize: setup  ## merge the manifests of an array run (OUT)
	$(VENV)/bin/npp tokenize finalize --out $(OUT)

clean-venv:  ## remove .venv (the next target reinstalls)
	rm -rf $(VENV)
