# All set-up happens here: `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo install mutants clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test,data,hf]'
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || echo "chromium not installed: the HTML rendering test will be skipped"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

# the mutation check of the test suite (slow: not part of `make test`)
mutants: $(STAMP)
	$(PY) tests/mutants.py --out benchmarks/results/mutants.md

demo: $(STAMP)
	$(PY) -m egp_fx demo

clean:
	rm -rf $(VENV) build *.egg-info
