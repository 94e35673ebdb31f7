PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Test workers: each test file runs on one worker (--dist loadfile), files in parallel.
TEST_JOBS ?= 3

.PHONY: install deps system-deps proto lint test demo bench clean images compose-demo soak fuzz

system-deps:
	bash scripts/install-system-deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: system-deps $(STAMP)

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

lint: $(STAMP)
	$(VENV)/bin/ruff check splitmirror primaryd secondaryd client tests bench scripts
	$(VENV)/bin/mypy --strict splitmirror primaryd secondaryd client
	$(VENV)/bin/lint-imports

test: install lint
	$(VENV)/bin/pytest -q -rs -n $(TEST_JOBS) --dist loadfile tests

demo: install
	$(PY) scripts/demo.py

soak: install
	SPLITMIRROR_SOAK_SCHEDULES=1000 $(VENV)/bin/pytest -q -rxf tests/test_faults.py -k test_fault_schedule

# Seeded fuzz campaigns against running daemons (docs/security.md has the figures):
# the interconnect, then NBD when tests/nbd_fuzz.py is there.
FUZZ_SEED ?= 1
FUZZ_INPUTS ?= 100000
fuzz: install
	$(PY) -m tests.ic_fuzz --seed $(FUZZ_SEED) --inputs $(FUZZ_INPUTS)
	if [ -f tests/nbd_fuzz.py ]; then $(PY) -m tests.nbd_fuzz --seed $(FUZZ_SEED) --count $(FUZZ_INPUTS); fi

images:
	bash scripts/build-images.sh

compose-demo: install images
	$(PY) scripts/compose_demo.py --no-build

bench: install
	$(PY) bench/write_path.py
	$(PY) bench/bitmap.py
	$(PY) bench/nbd.py
	$(PY) bench/backup.py
	$(PY) bench/marker_stall.py
	$(PY) bench/receipts.py
	$(PY) bench/restore.py
	$(PY) bench/async.py
	$(PY) bench/resync.py
	$(PY) bench/qemu_bench.py
	$(PY) bench/nbdcopy.py
	$(PY) bench/flush_latency.py
	$(PY) bench/pgbench.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
