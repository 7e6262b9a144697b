# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment when it is missing and installs the package (editable).
# `make docs` also installs the docs extra and builds the documentation site into site/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorax-cil-installed
DEMO_ARGS ?=

.PHONY: demo test install docs clean-venv

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorax-cil demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# The documentation site (MkDocs Material + mkdocstrings) into site/; warnings are errors.
DOCS_STAMP := $(VENV)/.lorax-cil-docs-installed

$(DOCS_STAMP): $(STAMP) setup.cfg
	$(PY) -m pip install --quiet -e '.[test,docs]'
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean-venv:
	rm -rf $(VENV)
