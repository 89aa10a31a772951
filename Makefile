# Two entry points for a newcomer: `make demo` and `make test`. Both prepare .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install

install: $(STAMP)

# torch is installed first on its own, pinned to the CPU build, so that nothing resolves a newer
# (multi-GB CUDA) release for it afterwards.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demos/llm_workflow_demo.py

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: $(STAMP)
	bash scripts/ensure_browser.sh
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc
