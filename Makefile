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
# (Most integration tests wait on launches, servers, signals and SLURM: with 2 workers on 2 cores the cores were
# busy 1.43 of 2 on average; 3 workers took 0.80x the time of 2, docs/testing.md.)
#: test: pytest-xdist workers, each running whole test files (0: one process, for debugging)
TEST_WORKERS ?= 3
TEST_PARALLEL = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
# one OpenMP/BLAS thread per worker (unless set): two workers' threads on two cores spin-wait on each other
TEST_THREADS = $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=$${MKL_NUM_THREADS:-1})
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.DEFAULT_GOAL := help
.PHONY: help setup assets lint test test-fast bench gpu-check gpu-wheels clean-venv tokenize tokenize-slurm tokenize-finalize toy train train-slurm branch branch-slurm compare-runs compare-runs-slurm export ui sample sample-slurm eval eval-slurm eval-ref compare reproduce reproduce-slurm demo demo-compare ui-screenshots

# Variables (`make help` lists them). Those left empty are not passed: npp's own default applies, so a default
# changed in Python reaches make and sbatch runs too. The `#:` line above each is its meaning.
# tokenize: `make tokenize DATA=/data/imagenet/train VQ=ckpts/vq_ds16_c2i.pt OUT=shards/in256`
#: images: ImageFolder root or parquet directory
DATA ?= data/imagenet/train
#: the VQ tokenizer
VQ ?= $(ASSETS_DIR)/vq_ds16_c2i.pt
#: the shard-set directory tokenize writes
OUT ?= shards/in256
#: pixels of the encoded crops (npp: 256)
IMAGE_SIZE ?=
#: images per shard (npp: 1000)
SAMPLES_PER_SHARD ?=
#: image-decoding / loader workers per process (npp: auto from SLURM's CPUs)
WORKERS ?=
#: more `npp tokenize run` flags, e.g. --ten-crop --crop-range 1.1,1.05
TOKENIZE_FLAGS ?=
#: tokenize-slurm: the SLURM array (tasks%parallel)
ARRAY ?= 0-31%8

# train: `make train SHARDS=shards/in256 RUN=runs/gpt-b-npp MODEL=GPT-B NGPU=8`
#: the shard set(s) training reads
SHARDS ?= $(OUT)
#: the run directory (a rerun resumes it)
RUN ?= runs/npp
#: model size (npp: GPT-B; `npp models` lists them)
MODEL ?=
#: patch schedule (npp: 4:0.25,2:0.25,1:0.5; 1:1 = next-token baseline)
SCHEDULE ?=
#: epochs (npp: 300)
EPOCHS ?=
#: samples per optimizer step (npp: 256)
GLOBAL_BATCH ?=
#: DeepSpeed JSON (npp: ds_configs/zero2.json)
DS_CONFIG ?=
#: more `npp train` flags (`npp train --help`)
TRAIN_FLAGS ?=
#: processes per node: train and sample (torchrun)
NGPU ?= 1
#: train-slurm / sample-slurm: nodes
NODES ?= 1
#: *-slurm: GPUs per node (the login-node check plans for NODES x GPUS_PER_NODE ranks)
GPUS_PER_NODE ?= 8
#: extra sbatch flags for the *-slurm targets, e.g. --partition=gpu --account=me
SBATCH_FLAGS ?=

# branch: `make branch FROM=runs/gpt-b-ntp EPOCHS=173 RUN=runs/gpt-b-ntp-e173 NGPU=8`
#: branch: the NTP run started with --branch-epochs whose kept checkpoint the branch starts from
FROM ?=

# compare-runs: `make compare-runs-slurm SHARDS=shards/in256 MODEL=GPT-B SEEDS=0,1,2 NODES=1`
#: compare-runs: the folder of every run of the experiment and of its comparison
RUNS ?= runs/compare
#: compare-runs: comma-separated seeds (npp: 0)
SEEDS ?=
#: compare-runs: NPP schedules separated by ';' (npp: 4:0.25,2:0.25,1:0.5)
SCHEDULES ?=
#: compare-runs: NTP budgets branched off the NTP run (npp: each schedule's compute-matched epochs, E/4, E/2, 3E/4)
BRANCH_EPOCHS ?=
#: compare-runs: more `npp compare runs` flags, e.g. --per-class 50 --train-flags '--global-batch 256'
COMPARE_FLAGS ?=

# reproduce: `make reproduce MODEL=GPT-B SCHEDULE=npp NGPU=8` (`npp reproduce list` shows the releases)
#: reproduce: samples, metrics and report of each release
REPRODUCE_OUT ?= reproduce
#: more `npp reproduce` flags, e.g. --num-samples 10000 (an override the report names)
REPRODUCE_FLAGS ?=

# ui-screenshots: `make ui-screenshots STORE=sqlite:///demo_out/mlflow.db` (needs chromium)
#: ui-screenshots: the tracking store whose UI is shot
STORE ?= $(MLFLOW_TRACKING_URI)
#: ui-screenshots: where the PNGs go
UI_SHOTS ?= docs/img

# sample / eval: `make sample CKPT=runs/gpt-b-npp/model.pt VQ=ckpts/vq_ds16_c2i.pt CFG=2.0`
#: the exported model to sample
CKPT ?= $(RUN)/model.pt
#: where samples go
SAMPLES ?= $(RUN)/samples
#: guidance scale(s), e.g. 2.0 or 1.5,2.0,2.5 (npp: 2.0)
CFG ?=
#: samples per class (npp: 50 = FID-50k)
PER_CLASS ?=
#: samples per piece (npp: 0 = the largest the free GPU memory holds)
SAMPLE_BATCH ?=
#: more `npp sample` flags
SAMPLE_FLAGS ?=
#: ADM's reference batch
REF ?= $(ASSETS_DIR)/VIRTUAL_imagenet256_labeled.npz
#: eval-ref: the reference statistics it writes (never over REF)
REF_OUT ?= ckpts/ref_$(notdir $(SHARDS)).npz
#: eval-ref: real images used (npp: 50000, as ADM's batches)
REF_LIMIT ?=
#: eval-slurm: CPUs of the evaluation job (image decoding and the k-NN of precision/recall run there too)
EVAL_CPUS ?= 8
#: FID Inception weights
INCEPTION ?= $(ASSETS_DIR)/pt_inception-2015-12-05-6726825d.pth
#: more `npp eval` flags
EVAL_FLAGS ?=
#: compare / ui: the MLflow experiment (npp: npp)
EXPERIMENT ?=
#: assets: where the downloaded files go (VQ, REF and INCEPTION default to its files)
ASSETS_DIR ?= ckpts
#: more `npp assets` flags, e.g. --only vq_ds16_c2i.pt or --manifest mirror.json
ASSETS_FLAGS ?=
#: gpu-wheels: the GPU machine's Python (its wheels are downloaded for it)
GPU_PYTHON_VERSION ?= 3.12
#: gpu-check flags, e.g. --out figures.jsonl --only train
GPU_CHECK_FLAGS ?=

# `$(call opt,--flag,$(VAR))`: the flag only when the variable is set
opt = $(if $(strip $(2)),$(1) $(2))
TOKENIZE_ARGS = --data $(DATA) --vq $(VQ) --out $(OUT) $(call opt,--image-size,$(IMAGE_SIZE)) \
  $(call opt,--samples-per-shard,$(SAMPLES_PER_SHARD)) $(call opt,--workers,$(WORKERS)) $(TOKENIZE_FLAGS)
TRAIN_ARGS = --shards $(SHARDS) --out $(RUN) $(call opt,--model,$(MODEL)) $(call opt,--schedule,$(SCHEDULE)) \
  $(call opt,--epochs,$(EPOCHS)) $(call opt,--global-batch,$(GLOBAL_BATCH)) $(call opt,--ds-config,$(DS_CONFIG)) \
  $(call opt,--workers,$(WORKERS)) $(TRAIN_FLAGS)
BRANCH_ARGS = --from $(FROM) --epochs $(EPOCHS) --out $(RUN)
COMPARE_RUNS_ARGS = --shards $(SHARDS) --vq $(VQ) --ref $(REF) $(call opt,--inception,$(INCEPTION)) --out $(RUNS) \
  $(call opt,--model,$(MODEL)) $(call opt,--epochs,$(EPOCHS)) $(call opt,--seeds,$(SEEDS)) \
  $(call opt,--schedules,$(if $(strip $(SCHEDULES)),"$(SCHEDULES)")) $(call opt,--branch-epochs,$(BRANCH_EPOCHS)) \
  $(call opt,--per-class,$(PER_CLASS)) $(call opt,--cfg-scale,$(CFG)) $(call opt,--experiment,$(EXPERIMENT)) \
  $(COMPARE_FLAGS)
REPRODUCE_ARGS = --model $(or $(MODEL),GPT-B) --schedule $(or $(SCHEDULE),npp) --assets $(ASSETS_DIR) \
  --out $(REPRODUCE_OUT) $(call opt,--experiment,$(EXPERIMENT)) $(REPRODUCE_FLAGS)
SAMPLE_ARGS = --ckpt $(CKPT) --vq $(VQ) --out $(SAMPLES) $(call opt,--per-class,$(PER_CLASS)) \
  $(call opt,--cfg-scale,$(CFG)) $(call opt,--batch,$(SAMPLE_BATCH)) $(SAMPLE_FLAGS)

help:  ## list the targets and the variables they read
	@echo "targets (make TARGET VAR=value ...):"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-17s %s\n", $$1, $$2}'
	@echo "variables (default; empty = npp's own default, named in the text):"
	@awk '/^#: /{m=substr($$0,4); next} /^[A-Z_]+ \?=/{if (m != "") {v=$$0; sub(/^[A-Z_]+ \?= ?/,"",v); \
	  printf "  %-17s %-30s %s\n", $$1, (v == "" ? "(empty)" : v), m}; m=""; next} {m=""}' $(MAKEFILE_LIST)

setup: $(STAMP)  ## create .venv and install npp with pinned dependencies (idempotent)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(if $(filter 1,$(SYSTEM_SITE)),--system-site-packages) $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=68" wheel packaging ninja
	@# torch first: keep one that is already importable (a user's CUDA build).
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else $(PIP) install -q "$$(grep -E '^torch==' requirements.txt)"; fi
	@$(PY) -c "import sys, torch; v = torch.__version__.split('+')[0].split('.'); sys.exit(0 if (int(v[0]), int(v[1])) >= (2, 7) else \
	  f'torch {torch.__version__} is older than 2.7, the oldest npp runs with: load a newer one, or make setup without SYSTEM_SITE=1')"
	@# deepspeed's setup.py imports torch: without isolation it sees ours instead of downloading a CUDA torch
	@# into a build environment. DS_ACCELERATOR=cpu: its setup.py asks for nvcc when it sees CUDA (a GPU node
	@# without a CUDA toolkit); DeepSpeed still picks the accelerator when it runs (nothing is compiled here).
	DS_ACCELERATOR=cpu $(PIP) install -q --no-build-isolation "$$(grep -E '^deepspeed==' requirements.txt)"
	grep -vE '^(torch|deepspeed)==|^#|^$$' requirements.txt requirements-test.txt | cut -d: -f2 > $(VENV)/.npp-reqs.txt
	$(PIP) install -q -r $(VENV)/.npp-reqs.txt
	$(PIP) install -q --no-deps -e .
	@touch $@

demo: setup  ## the whole pipeline on the built-in toy set, CPU only (minutes; README has the time measured; reruns reuse what is built)
	$(VENV)/bin/npp demo --out demo_out

demo-compare: setup  ## NPP vs NTP on the toy set, fairly: NTP with a branch at NPP's FLOPs, every end evaluated alike, compared
	$(VENV)/bin/npp demo compare --out demo_out

assets: setup  ## download LlamaGen's VQ tokenizer, ADM's reference batch, the FID Inception weights into ASSETS_DIR (checked, resumable) [ASSETS_DIR ASSETS_FLAGS]
	$(VENV)/bin/npp assets --out $(ASSETS_DIR) $(ASSETS_FLAGS)

lint: setup  ## ruff with the rules chosen in pyproject.toml (pyflakes, pycodestyle, isort, pyupgrade, bugbear)
	$(PY) -m ruff check npp tests bench

test: setup lint  ## the linter, then the whole test suite (CPU only, slow integration tests included) [TEST_WORKERS PYTEST_ARGS]
	$(TEST_THREADS) $(PY) -m pytest $(TEST_PARALLEL) $(PYTEST_ARGS)

test-fast: setup  ## the suite without the slow integration tests [TEST_WORKERS PYTEST_ARGS]
	$(TEST_THREADS) $(PY) -m pytest -m "not slow" $(TEST_PARALLEL) $(PYTEST_ARGS)

bench: setup  ## print the benchmark figures (see README)
	$(PY) bench/npp_cost.py
	$(PY) bench/step_overhead.py
	OMP_NUM_THREADS=1 $(PY) bench/step_overhead.py --narrow
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node 2 bench/step_overhead.py --narrow
	$(PY) bench/tokenize_throughput.py
	$(PY) bench/train_throughput.py
	$(PY) bench/eval_throughput.py

gpu-wheels: setup  ## the wheels a GPU machine without a package index lacks (bench/gpu_image.py's CARRIED: deepspeed, pydantic with the typing_extensions it needs, fire, webdataset, ...), into .whl/ (carry it; bench/gpu_session.sh installs them) [GPU_PYTHON_VERSION]
	mkdir -p .whl
	DS_ACCELERATOR=cpu $(PIP) wheel -q --no-deps --no-build-isolation -w .whl deepspeed==$$($(PY) -c "from importlib.metadata import version; print(version('deepspeed'))")
	$(PIP) download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) --implementation cp \
	  --platform manylinux2014_x86_64 -d .whl $$($(PY) bench/gpu_image.py --carried)
	@ls .whl

gpu-check: setup  ## one-shot GPU check (bench/gpu_check.py): npp step vs plain PyTorch, MFU, memory, sampling; exits 0 without CUDA
	$(PY) bench/gpu_check.py $(GPU_CHECK_FLAGS)

tokenize: setup  ## images (DATA) -> VQ codes -> shards (OUT) on this machine; reruns resume [DATA VQ OUT IMAGE_SIZE SAMPLES_PER_SHARD WORKERS TOKENIZE_FLAGS]
	$(VENV)/bin/npp tokenize run $(TOKENIZE_ARGS)

tokenize-slurm: setup  ## the same as a SLURM array job, checked here first [ARRAY SBATCH_FLAGS + tokenize's]
	@# the flags and inputs are checked on this (login) node: a typo never waits in the queue
	$(VENV)/bin/npp tokenize run check $(TOKENIZE_ARGS)
	@# SLURM opens --output=logs/... before the job runs: logs/ is in the repository (recreated if deleted)
	mkdir -p logs
	TOKENIZE_ARGS="$(TOKENIZE_ARGS)" sbatch $(SBATCH_FLAGS) --array=$(ARRAY) slurm/tokenize.sbatch

train: setup  ## train on SHARDS into RUN on this machine (NGPU processes); reruns resume [SHARDS RUN MODEL SCHEDULE EPOCHS GLOBAL_BATCH DS_CONFIG WORKERS TRAIN_FLAGS NGPU]
	@# checked first, for NGPU ranks: a typo is one line, not npp's line and then torchrun's traceback
	$(VENV)/bin/npp train check $(TRAIN_ARGS) --world-size $(NGPU)
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NGPU) -m npp train $(TRAIN_ARGS)

train-slurm: setup  ## the same on NODES nodes with SLURM (preemption: checkpoint + requeue), checked here first [NODES GPUS_PER_NODE SBATCH_FLAGS + train's]
	@# the flags and inputs are checked on this (login) node for the job's world size: a typo never waits in the queue
	$(VENV)/bin/npp train check $(TRAIN_ARGS) --world-size $$(( $(NODES) * $(GPUS_PER_NODE) ))
	mkdir -p logs
	TRAIN_ARGS="$(TRAIN_ARGS)" GPUS_PER_NODE=$(GPUS_PER_NODE) sbatch $(SBATCH_FLAGS) --nodes=$(NODES) slurm/train.sbatch

branch: setup  ## the EPOCHS-epoch branch of FROM (trained with --branch-epochs) into RUN: its decay alone, the same run as from scratch; reruns resume [FROM EPOCHS RUN NGPU]
	$(VENV)/bin/npp train branch $(BRANCH_ARGS) --check --world-size $(NGPU)
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NGPU) -m npp train branch $(BRANCH_ARGS)

branch-slurm: setup  ## the same as a SLURM job on NODES nodes, checked here first [FROM EPOCHS RUN NODES GPUS_PER_NODE SBATCH_FLAGS]
	$(VENV)/bin/npp train branch $(BRANCH_ARGS) --check --world-size $$(( $(NODES) * $(GPUS_PER_NODE) ))
	mkdir -p logs
	TRAIN_COMMAND="train branch" TRAIN_ARGS="$(BRANCH_ARGS)" GPUS_PER_NODE=$(GPUS_PER_NODE) \
	  sbatch $(SBATCH_FLAGS) --nodes=$(NODES) slurm/train.sbatch

compare-runs: setup  ## the fair NPP-vs-NTP experiment here: per seed NTP + its branches + NPP, every end evaluated alike, then compare [SHARDS VQ REF INCEPTION RUNS MODEL EPOCHS SEEDS SCHEDULES BRANCH_EPOCHS PER_CLASS CFG NGPU COMPARE_FLAGS]
	$(VENV)/bin/npp compare runs $(COMPARE_RUNS_ARGS) --nproc $(NGPU)

compare-runs-slurm: setup  ## the same as chained SLURM jobs (afterok), the comparison last [compare-runs' + NODES GPUS_PER_NODE SBATCH_FLAGS]
	$(VENV)/bin/npp compare runs $(COMPARE_RUNS_ARGS) --slurm --nproc $(GPUS_PER_NODE) --nodes $(NODES) \
	  $(call opt,--sbatch-flags,$(if $(strip $(SBATCH_FLAGS)),"$(SBATCH_FLAGS)"))

export: setup  ## consolidated fp32 checkpoint of RUN (LlamaGen format) at RUN/model.pt [RUN]
	$(VENV)/bin/npp train export --run $(RUN)

sample: setup  ## class-balanced guided samples of CKPT (NGPU processes) into SAMPLES; reruns resume [CKPT VQ SAMPLES CFG PER_CLASS SAMPLE_BATCH SAMPLE_FLAGS NGPU]
	$(VENV)/bin/npp sample check $(SAMPLE_ARGS)
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NGPU) -m npp sample $(SAMPLE_ARGS)

sample-slurm: setup  ## the same as a SLURM job on NODES nodes (requeues and resumes), then eval when REF is set [NODES GPUS_PER_NODE SBATCH_FLAGS EVAL_FLAGS + sample's]
	$(VENV)/bin/npp sample check $(SAMPLE_ARGS)
	mkdir -p logs
	SAMPLE_ARGS="$(SAMPLE_ARGS)" GPUS_PER_NODE=$(GPUS_PER_NODE) \
	  EVAL_ARGS="$(if $(strip $(REF)),--ref $(REF) --ckpt $(CKPT) $(call opt,--inception,$(INCEPTION)) $(EVAL_FLAGS))" \
	  sbatch $(SBATCH_FLAGS) --nodes=$(NODES) slurm/sample.sbatch

eval-slurm: setup  ## eval of SAMPLES as a one-GPU SLURM job (metrics cached: a rerun recomputes nothing) [SAMPLES REF CKPT INCEPTION EVAL_FLAGS SBATCH_FLAGS]
	mkdir -p logs
	sbatch $(SBATCH_FLAGS) --job-name=npp-eval --output=logs/%x_%j.out --nodes=1 --ntasks=1 --gres=gpu:1 --requeue \
	  --cpus-per-task=$(EVAL_CPUS) \
	  --wrap '$(VENV)/bin/npp eval --samples "$(SAMPLES)/samples_cfg*.npz" --ref $(REF) --ckpt $(CKPT) \
	  $(call opt,--inception,$(INCEPTION)) $(EVAL_FLAGS)'

eval: setup  ## FID/sFID/IS/precision/recall of SAMPLES against REF, logged into the run of CKPT [SAMPLES REF CKPT INCEPTION EVAL_FLAGS]
	$(VENV)/bin/npp eval --samples "$(SAMPLES)/samples_cfg*.npz" --ref $(REF) --ckpt $(CKPT) \
	  $(call opt,--inception,$(INCEPTION)) $(EVAL_FLAGS)

eval-ref: setup  ## reference statistics (REF_OUT) from real images of SHARDS' source, streamed [SHARDS REF_OUT REF_LIMIT INCEPTION EVAL_FLAGS]
	$(VENV)/bin/npp eval ref --shards $(SHARDS) --out $(REF_OUT) $(call opt,--limit,$(REF_LIMIT)) --inception $(INCEPTION) \
	  $(EVAL_FLAGS)

reproduce: setup  ## a released GPT's published FID measured: fetch, sample 50k with the published settings (NGPU), evaluate, report [MODEL SCHEDULE=npp|ntp ASSETS_DIR REPRODUCE_OUT REPRODUCE_FLAGS NGPU]
	$(VENV)/bin/npp reproduce $(REPRODUCE_ARGS) --nproc $(NGPU)

reproduce-slurm: setup  ## the same as a SLURM sampling job (then eval) and a report job after it [reproduce's + NODES GPUS_PER_NODE SBATCH_FLAGS]
	$(VENV)/bin/npp reproduce $(REPRODUCE_ARGS) --slurm --nproc $(GPUS_PER_NODE) --nodes $(NODES) \
	  $(call opt,--sbatch-flags,$(if $(strip $(SBATCH_FLAGS)),"$(SBATCH_FLAGS)"))

compare: setup  ## NPP vs the annealed NTP ends of every run of the experiment: ratios, equal-epoch differences, seeds, figure [EXPERIMENT]
	$(VENV)/bin/npp compare --out compare $(call opt,--experiment,$(EXPERIMENT))

ui: setup  ## the MLflow UI on 127.0.0.1:5000 for $(MLFLOW_TRACKING_URI); prints the URL of EXPERIMENT's training runs [EXPERIMENT]
	$(VENV)/bin/npp ui $(call opt,--experiment,$(EXPERIMENT)) --host 127.0.0.1 --port 5000

ui-screenshots: setup  ## headless-Chromium screenshots of the MLflow UI (runs table, charts, a run, the comparison) into UI_SHOTS [STORE EXPERIMENT]
	$(PY) bench/ui_screenshots.py --store $(STORE) --experiment $(or $(EXPERIMENT),npp) --out $(UI_SHOTS)

tokenize-finalize: setup  ## merge the manifests of an array run [OUT]
	$(VENV)/bin/npp tokenize finalize --out $(OUT)

clean-venv:  ## remove .venv (the next target reinstalls)
	rm -rf $(VENV)
