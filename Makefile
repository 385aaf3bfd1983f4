# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= models/smollm2-135m
# Dataset names resolve under this directory (the shared data beside the checkout, when it exists).
export LRCOMPRESS_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export LRCOMPRESS_SMOLLM2 ?= $(abspath $(MODEL))

.PHONY: venv model demo test test-fast bench clean

venv: $(VENV)/.installed

# Two steps: the package (all that `make demo` needs), then the test extras. --no-compile: pip would
# byte-compile every file of torch & co. (about a third of the install's time); Python compiles what is
# imported, once, on first use.
$(VENV)/.installed-base: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -c constraints.txt -e .
	touch $@

$(VENV)/.installed: $(VENV)/.installed-base
	$(PY) -m pip install -q --no-compile -c constraints.txt -e '.[test]'
	touch $@

model: $(MODEL)/config.json

$(MODEL)/config.json: | $(VENV)/.installed-base
	$(PY) scripts/fetch_demo_model.py --out $(MODEL)

# The best recipe measured that fits 10 minutes on 2 cores from a fresh clone (recipes/demo.yaml; install and
# fetch included: bench/history/issue26-causes.md, "Stop 27"); the summary at the end shows
# WikiText-2 and web-text perplexity and the zero-shot average, each beside the dense model's.
demo: $(VENV)/.installed-base model
	$(VENV)/bin/lrcompress run recipes/demo.yaml --overwrite

# `make test` needs the shared data: a real-data test fails (naming the missing path) instead of skipping.
test: venv model
	$(VENV)/bin/ruff check lrcompress tests bench scripts
	LRCOMPRESS_REQUIRE_DATA=1 $(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not real_model"

bench: venv model
	$(PY) bench/quality.py

clean:
	rm -rf runs build *.egg-info
