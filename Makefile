# pebook: build the book, run the tests, regenerate the reference outputs.
#
#   make book    build the HTML book (every chapter executed on the CPU), check the
#                executed chapters against tests/notebooks/ (no second execution), then
#                load every page in headless Chromium (tests/sitecheck.py; make sitecheck)
#   make test    ruff (lint + format check) on pebook/, tests/ and the chapters' code, then the
#                unit tests in tests/ + nbval on every chapter's reference notebook
#   make bless   re-execute every chapter on the CPU into tests/notebooks/
#   make bench   python -m pebook.book.bench (uses CUDA when present)
#
# Each target first makes sure .venv exists and holds requirements.txt + pebook (editable).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pebook-installed
BUILD  := _build
NBREFS := $(PY) tests/nbrefs.py
SITECHECK := $(PY) tests/sitecheck.py
# The output of the last `jupyter-book build` (read by `sitecheck.py build-failure` on failure).
BOOK_LOG := $(BUILD)/jupyter-book.log
RUFF   := $(VENV)/bin/ruff
# What ruff lints and format-checks (settings in pyproject.toml). The chapters' code is checked
# through tests/notebooks/*.ipynb, which `nbrefs.py check` has just found equal to book/*.md;
# fix a finding in the chapter, then `make bless`.
LINT   := pebook tests
SANITIZE := tests/nbval_sanitize.cfg
# Per-cell time limit (seconds) under nbval; _config.yml sets the same for the book.
CELL_TIMEOUT := 120
# Chapters display figures inline, whatever MPLBACKEND the calling shell has.
INLINE_BACKEND := module://matplotlib_inline.backend_inline

# Book execution, regression runs and blessing are pinned to the CPU so that the stored
# outputs are deterministic. (make bench is left free to use CUDA.)
book test bless check-refs: export PEBOOK_DEVICE := cpu
book test bless check-refs: export CUDA_VISIBLE_DEVICES :=
book test bless check-refs: export PYTHONHASHSEED := 0
# Resolve the "python3" kernel from .venv, never from a user-level kernelspec.
book test bless check-refs: export JUPYTER_PREFER_ENV_PATH := 1
# Silence debugpy's "frozen modules" note on kernel start-up.
book test bless check-refs: export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: help venv book sitecheck test bless bench check-refs clean distclean

help:
	@echo "make book        build the book into $(BUILD)/html (CPU; a warning or cell error fails it), then"
	@echo "                 compare the executed chapters with tests/notebooks, check every page in Chromium"
	@echo "make sitecheck   only the Chromium check of the built pages (screenshots in $(BUILD)/screenshots)"
	@echo "make test        ruff, unit tests + nbval regression tests of tests/notebooks (what CI runs)"
	@echo "make bless       re-execute every chapter on the CPU into tests/notebooks (CHAPTERS=... for some)"
	@echo "make check-refs  only check that tests/notebooks is up to date with book/ and _toc.yml"
	@echo "make bench       python -m pebook.book.bench"
	@echo "make venv        only create/update $(VENV)"
	@echo "make clean       remove $(BUILD);  make distclean: also remove $(VENV)"

# The virtual environment: created once, re-installed when the pins or pyproject change.
$(STAMP): requirements.txt pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  echo "Creating $(VENV) with $(PYTHON)"; \
	  $(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v == (3, 11) else \
	  "$(VENV) runs Python %d.%d; requirements.txt is pinned for 3.11. Remove $(VENV) and rerun with PYTHON=/path/to/python3.11" % v)'
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

venv: $(STAMP)

# Only the pages of _toc.yml are built (_config.yml), so a book/*.ipynb made with jupytext is
# neither built nor compared. When the build fails, the last lines name the chapter, the cell
# and the exception (or the warnings that -W made fatal), from $(BOOK_LOG) and the reports
# of myst-nb under $(BUILD)/html/reports/.
JB_BUILD := MPLBACKEND=$(INLINE_BACKEND) PYTHONUNBUFFERED=1 $(VENV)/bin/jupyter-book build . -n -W --keep-going

book: $(STAMP)
	rm -rf $(BUILD)/html $(BUILD)/.doctrees $(BUILD)/jupyter_execute $(BUILD)/screenshots
	@mkdir -p $(BUILD)
	@echo '$(JB_BUILD)'
	@rc=0; $(JB_BUILD) 2>&1 | tee $(BOOK_LOG) || rc=$$?; \
	if [ $$rc -ne 0 ]; then echo >&2; $(SITECHECK) build-failure $(BOOK_LOG) --site $(BUILD)/html >&2; exit $$rc; fi
	$(NBREFS) check
	$(NBREFS) compare $(BUILD)/jupyter_execute --sanitize-with $(SANITIZE)
	$(SITECHECK) browse $(BUILD)/html --screenshots $(BUILD)/screenshots
	@echo
	@echo "Book built: $(CURDIR)/$(BUILD)/html/index.html"

# Headless Chromium (Debian's chromium package, /usr/bin/chromium) loads every page of the
# last build: raw TeX, console errors, requests off 127.0.0.1, broken images and links,
# horizontal scrolling at 1280 px, error outputs. Screenshots in $(BUILD)/screenshots/.
sitecheck: $(STAMP)
	$(SITECHECK) browse $(BUILD)/html --screenshots $(BUILD)/screenshots

check-refs: $(STAMP)
	$(NBREFS) check

# One pytest run collects the unit tests (tests/**/test_*.py) and, through --nbval, the
# reference notebooks (tests/notebooks/*.ipynb), each once. Exit status 5 ("no tests
# collected") is accepted only while there is neither a test file nor a reference.
PYTEST := $(PY) -m pytest --nbval --nbval-current-env --nbval-cell-timeout=$(CELL_TIMEOUT) \
	--nbval-sanitize-with $(SANITIZE) tests

test: $(STAMP)
	$(NBREFS) check
	$(RUFF) check $(LINT)
	$(RUFF) format --check $(LINT)
	@echo '$(PYTEST)'
	@rc=0; $(PYTEST) || rc=$$?; \
	if [ $$rc -eq 5 ] && [ -z "$$(find tests -name 'test_*.py' -o -name '*_test.py' -o -name '*.ipynb')" ]; then \
	  echo "make test: no unit tests and no reference notebooks yet"; rc=0; \
	fi; exit $$rc

# make bless CHAPTERS="quickstart ..." re-blesses only those chapters.
CHAPTERS ?=
bless: $(STAMP)
	$(NBREFS) bless --timeout $(CELL_TIMEOUT) $(CHAPTERS)

bench: $(STAMP)
	$(PY) -m pebook.book.bench

clean:
	rm -rf $(BUILD)

distclean: clean
	rm -rf $(VENV)
