# radstream — the two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= demo_out
# make wheelhouse: every wheel radstream needs, for another machine's Python and platform. pip matches
# manylinux_2_N tags exactly, hence the list: glibc 2.17 to 2.39 (torch's CUDA wheels use several N).
WHEEL_PY ?= 3.12
WHEEL_PLATFORM ?= $(foreach n,$(shell seq 17 39),manylinux_2_$(n)_x86_64) manylinux2014_x86_64 manylinux1_x86_64
WHEELHOUSE ?= wheelhouse
WHEEL_EXTRAS ?= remote
# make gpu-check runs with the venv's Python when there is one, else the machine's (a GPU box's own torch).
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_OUT ?= gpu_check

.PHONY: install demo test test-all lint bench wheelhouse gpu-check device-wheels

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/radstream demo $(DEMO_OUT)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/codecs.py
	$(PY) benchmarks/ingest.py

wheelhouse:
	mkdir -p $(WHEELHOUSE)
	$(PYTHON) -m pip wheel --no-deps -w $(WHEELHOUSE) .
	$(PYTHON) -m pip download -d $(WHEELHOUSE) --find-links $(WHEELHOUSE) --only-binary=:all: \
		--python-version $(WHEEL_PY) --implementation cp $(addprefix --platform ,$(WHEEL_PLATFORM)) \
		"$$(ls $(WHEELHOUSE)/radstream-*.whl | tail -n 1)[$(WHEEL_EXTRAS)]" $(TORCH_SPEC)
	@echo "offline: python$(WHEEL_PY) -m venv .venv && .venv/bin/pip install --no-index --find-links $(WHEELHOUSE) radstream"

gpu-check:
	$(GPU_PYTHON) -m radstream.cli gpu-check --out $(GPU_CHECK_OUT)

# The wheels a GPU machine without internet lacks, cut into pieces the device tool can carry (docs/gpu.md).
device-wheels:
	bash scripts/device_wheels.sh
