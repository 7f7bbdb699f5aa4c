# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mzoo-installed

.PHONY: demo test venv clean venv-mcore-latest test-mcore-latest

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a CPU build of 2.13.0, so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]" "torch==2.13.0"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/mzoo demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

# Outside CI: the megatron-core harness against the newest megatron-core (or MCORE=megatron-core==X).
# megatron-core >= 0.17 needs Python >= 3.12, whose torch 2.13.0 on PyPI is a CUDA build (about 5 GB;
# it runs on the CPU). Remake tests/fixtures/mcore-<version>/ with its make.py in this venv.
PY312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python) $(shell command -v python3.12))
MCORE ?= megatron-core
LATEST := .venv-mcore-latest
MCORE_TESTS := tests/mzoo/test_megatron_core_harness.py tests/converters/test_megatron_core.py \
	tests/converters/test_megatron_lm_args.py tests/converters/test_megatron_core_zarr.py \
	tests/converters/test_megatron_core_moe.py tests/converters/test_megatron_core_latest.py
# (test_mamba_formats' megatron-core test needs 0.16: 0.17+ builds MambaModel through HybridStack, which needs TE)

$(LATEST)/.installed: pyproject.toml
	@test -n "$(PY312)" || { echo "megatron-core >= 0.17 needs Python 3.12; set PY312=/path/to/python3.12."; exit 2; }
	test -x $(LATEST)/bin/python || $(PY312) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet --upgrade "torch==2.13.0" "$(MCORE)"
	$(LATEST)/bin/pip install --quiet -e . "torch==2.13.0" pytest pytest-xdist psutil tokenizers "zarr>=2.18,<3" hypothesis
	touch $@

venv-mcore-latest: $(LATEST)/.installed

test-mcore-latest: venv-mcore-latest
	$(LATEST)/bin/python -c "import megatron.core as m; print('megatron-core', m.__version__)"
	$(LATEST)/bin/python -m pytest -n 2 -q $(MCORE_TESTS)

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
