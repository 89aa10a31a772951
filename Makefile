# Two entry points for a newcomer: `make demo` and `make test`. Both prepare .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A second environment on TransformerLens 4 (TransformerBridge). SAELens pins transformer-lens < 4,
# so it is not installed there and the tests that need it skip.
VENV_TL4 ?= .venv-tl4
PY_TL4 := $(VENV_TL4)/bin/python
STAMP_TL4 := $(VENV_TL4)/.installed

.PHONY: demo test test-tl3 test-tl4 install install-tl4

install: $(STAMP)

install-tl4: $(STAMP_TL4)

# torch is installed first on its own, pinned to the CPU build, so that nothing resolves a newer
# (multi-GB CUDA) release for it afterwards.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

$(STAMP_TL4): pyproject.toml
	python3 -m venv $(VENV_TL4)
	$(PY_TL4) -m pip install --quiet --upgrade pip
	$(PY_TL4) -m pip install --quiet torch==2.13.0
	$(PY_TL4) -m pip install --quiet "transformer-lens>=4,<5"
	$(PY_TL4) -m pip install --quiet -e ".[test-tl4]"
	touch $(STAMP_TL4)

demo: $(STAMP)
	$(PY) demos/llm_workflow_demo.py

# pytest exits 5 when it collects no test: that is not a failure of the suite.
PYTEST = pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The suite on TransformerLens 3, then again on TransformerLens 4.
test: test-tl3 test-tl4

test-tl3: $(STAMP)
	bash scripts/ensure_browser.sh
	$(PY) -m $(PYTEST)

test-tl4: $(STAMP_TL4)
	bash scripts/ensure_browser.sh
	$(PY_TL4) -m $(PYTEST)
