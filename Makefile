# The two commands of the README: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 5050

.PHONY: run test bench-loadgen clean

$(BIN)/twistd: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/twistd
	$(BIN)/twistd -n --pidfile= primecount --port $(PORT)

test: $(BIN)/twistd
	$(BIN)/trial tests

# Side-by-side figures against the original server, with the loadgen from ../shared/tools.
bench-loadgen: $(BIN)/twistd
	$(BIN)/python contrib/bench/loadgen_compare.py

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp twisted/plugins/dropin.cache
