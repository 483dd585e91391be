# jaxshape entry points. Needs only Python 3.11 and make: everything else goes into .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= runs
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install test demo bench lint data clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# FashionMNIST for the demo and experiments: Debian's package where apt is usable as root,
# otherwise the first load downloads it through tensorflow-datasets.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "FashionMNIST present in $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) \
	  || echo "apt could not install dataset-fashion-mnist; the first load will download FashionMNIST through tensorflow-datasets"; \
	else \
	  echo "No apt as root here: the first load will download FashionMNIST through tensorflow-datasets (needs internet), or pass --data_dir with the IDX files."; \
	fi

demo: $(STAMP) data
	$(PY) -m experiments.indiscriminate --preset=quick --out=$(OUT)/demo

bench: $(STAMP)
	$(PY) -m experiments.bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
