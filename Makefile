# Every target creates the virtualenv and installs the package on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo
# make demo: the real model. TOKENS (KD tokens), BUDGET (training minutes per student, every stage counted, e.g. 15m)
# and EXAMPLES (evaluated lines) left empty keep the config's.
DEMO_OUT     ?= runs/demo-real
DEMO_STUDENT ?= students/kd-30-ffn384-heads6
TOKENS       ?=
BUDGET       ?=
EXAMPLES     ?=

.PHONY: install demo study-toy study-real test lint format clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## The main job on the real model: SmolLM2-135M fetched and imported, one student at half its compute per token (all
## 30 blocks, each thinned) distilled from it on the raw standard library, teacher and student evaluated side by
## side (configs/demo-real.yaml).
demo: $(STAMP)
	$(BIN)/distil-codegpt sweep configs/demo-real.yaml --out $(DEMO_OUT) \
		$(if $(TOKENS),--student-tokens $(TOKENS)) $(if $(BUDGET),--student-minutes $(patsubst %m,%,$(BUDGET))) \
		$(if $(EXAMPLES),--eval-limit $(EXAMPLES))
	@test -f $(DEMO_OUT)/student-q8_0.gguf || $(BIN)/distil-codegpt export --model $(DEMO_OUT)/$(DEMO_STUDENT) \
		--format gguf --quant q8_0 --out $(DEMO_OUT)/student-q8_0.gguf
	@echo "the student for llama.cpp, Ollama and LM Studio: $(DEMO_OUT)/student-q8_0.gguf"
	@echo "  llama-server -m $(DEMO_OUT)/student-q8_0.gguf --port 8012   # llama.vscode"
	@echo "  ollama create student -f $(DEMO_OUT)/student-q8_0.Modelfile"
	@echo "serve the student to an editor: $(BIN)/distil-codegpt serve --model $(DEMO_OUT)/$(DEMO_STUDENT)"

## The seed study's experiment at toy scale: a teacher trained here from scratch (configs/study-toy.yaml).
study-toy: $(STAMP)
	$(BIN)/distil-codegpt sweep configs/study-toy.yaml --out $(OUT)

## The study on the real teacher, estimated at about 3 hours on 2 cores (configs/real.yaml).
study-real: $(STAMP)
	$(BIN)/distil-codegpt sweep configs/real.yaml --out runs/real

## The test suite (CPU, tiny models and data made by the tests).
test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
