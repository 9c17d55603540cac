# make search : create .venv if missing, install, run the default search (tune/search.py on Digits-LT)
# make test   : create .venv if missing, install, run the test suite
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: search test smoke install clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

search: install
	$(BIN)/python tune/search.py $(ARGS)

smoke: install
	$(BIN)/python -m pdcbdm.train --preset smoke --out runs/smoke

test: install
	$(BIN)/python -m pytest -q $(ARGS)

clean-venv:
	rm -rf $(VENV)
