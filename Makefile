# Sleep Lab. `make run` sets everything up and starts the lab; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: setup run test bench stress long-chat user-check export-check repetition-check asleep-check stop-check budget-check writing-check tier-check layers-check clean

$(STAMP): requirements.txt requirements-nodeps.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python launch.py $(ARGS)

# two pytest workers, one torch thread each (tests/conftest.py), the longest modules first and an idle
# worker taking the other's queued tests (worksteal)
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=10 tests

# kill-stress of the state dir (docs/reliability.md): TRIALS killed runs of sleep/teach/chat on a tiny model
TRIALS ?= 100
stress: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python tests/stress_state.py --trials $(TRIALS)

# the Wake fast weights over a long chat (README "Wake memory"): in-session gain on 8 test passages,
# then 200 turns of ordinary chat; 25 min with --threads 2 on 2 quiet cores (this target: 1 thread). ARGS="--set turns=40" for a short one.
long-chat: setup
	OMP_NUM_THREADS=1 $(BIN)/python launch.py lab wake --threads 1 --json --out reports/lab-wake --set reply_tokens=8 $(ARGS)

# the promise as a user meets it (README "Wake memory"): 40 chat turns, then 3 rounds of (teach 2 test
# passages, quick sleep), each followed by recall, interference and everyday questions against a fresh model;
# ~50 min with 2 threads on 2 quiet cores (the first sleep also consolidates the 40 turns)
user-check: setup
	$(BIN)/python launch.py lab wake --threads 2 --json --out reports/lab-user --set passages=0 --set turns=40 --set checkpoints= --set sleeps=3 $(ARGS)

# export of a slept embedded model, reloaded three ways (README "Take the slept model with you"); ~3 min
export-check: setup
	OMP_NUM_THREADS=1 $(BIN)/python tests/export_check.py 1

# which repetition penalty stops Wake's loops without hurting answers (dev data; README "Generation"); ~12 min
repetition-check: setup
	$(BIN)/python tests/repetition_check.py 2

# chat during a quick sleep on the embedded model: speed, pre-sleep answers, nothing lost (docs/reliability.md); ~5 min
asleep-check: setup
	$(BIN)/python tests/asleep_check.py 2

# do the presets keep their word: quick and full sleeps over 2 and 10 episodes, timed, with what the budget cut (README); ~25 min
budget-check: setup
	$(BIN)/python tests/budget_check.py 2

# the tier step: one slow expert, four, none (tier 2 just before a merge): recall, names swapped, everyday (dev; README); ~75 min
tier-check: setup
	$(BIN)/python tests/tier_step_check.py 2

# the teacher's writing with each episode read once against transformers' generate: time and tokens (README); ~5 min
writing-check: setup
	$(BIN)/python tests/teacher_writing_check.py 2 3

# which layers a sleep trains: the top half, two thirds, all (4 dev passages, one quick sleep, no budget; README); ~20 min
layers-check: setup
	$(BIN)/python tests/trained_layers_check.py 2

# how long Stop takes: a quick sleep stopped after 2–55 s (probes, teacher answers, steps); ~4 min
stop-check: setup
	$(BIN)/python tests/stop_check.py 2

bench: setup
	$(BIN)/python launch.py bench wake --json

clean:
	rm -rf $(VENV)
