# The README's commands. `make demo` and `make test` bootstrap .venv on first use (and again only
# when pyproject.toml changes), so a second call does not reinstall.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo

.PHONY: demo test test-fast bench lint clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "teststand needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[gui,dev,lab]'
	@touch $(STAMP)

# The same seed is the same simulated detector, so the AWC constants apply to the validation run.
demo: $(STAMP)
	$(BIN)/teststand run threshold-scan --stand sim --out $(OUT) --seed 1
	$(BIN)/teststand run awc-calibration --stand sim --out $(OUT) --seed 1 \
		--export-constants $(OUT)/awc-constants.json
	$(BIN)/teststand run awc-validation --stand sim --out $(OUT) --seed 1 \
		--constants $(OUT)/awc-constants.json

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info runs
