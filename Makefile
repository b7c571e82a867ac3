# vfio-user-emu — the two commands a new user needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOCKET ?= ./vfio-user.sock
DEVICE ?= testdev
STAMP := $(VENV)/.installed

.PHONY: run vm test lint typecheck unit venv clean fastpath qemu-guest lvu-samples fuzz

# The venv (and the C fast path, built in place by the editable install) is rebuilt when
# the project's metadata or the C sources change.
FASTPATH_SOURCES := setup.py devices/migration/fastpath/fastpath.c devices/migration/fastpath/build.py

$(STAMP): pyproject.toml $(FASTPATH_SOURCES)
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "error: $(PYTHON) lacks venv/ensurepip; on Debian: apt-get install python3-venv" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=77"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(STAMP)

# Rebuild only the C fast path in place (after editing devices/migration/fastpath/fastpath.c).
fastpath: $(STAMP)
	$(BIN)/python devices/migration/fastpath/build.py

run: $(STAMP)
	$(BIN)/vfio-user-emu serve --device $(DEVICE) --socket-path $(SOCKET) --print-qemu

# The quick start's second terminal: boot the test guest with a shell, attached to the
# device `make run` serves on $(SOCKET). scripts/qemu/run-vm builds QEMU and the guest into
# ~/.cache/vfio-user-emu the first time (scripts/qemu/build-qemu, build-guest), then reuses them.
vm: $(STAMP)
	@[ -S $(SOCKET) ] || { echo "error: no server socket at $(SOCKET): run \`make run\` in another terminal first" >&2; exit 1; }
	scripts/qemu/run-vm --interactive --socket $(SOCKET)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Real-QEMU guest tests (tests/qemu): QEMU and a small Linux guest are built once into
# ~/.cache/vfio-user-emu, then reused (scripts/qemu/build-qemu: 335 s of CPU, ~5 min on 2
# idle cores, 13 min measured on a loaded shared machine; build-guest ~10 s).
# QEMU_TESTS=auto (default): a failed build only skips those tests, with the reason, and is
# not retried for an hour (QEMU_RETRY_AFTER: no slow apt calls on every run of a machine
# without a mirror); QEMU_TESTS=require (CI): always tries, and a failed build or a skipped
# QEMU test fails; QEMU_TESTS=skip.
QEMU_TESTS ?= auto

qemu-guest:
	@case "$(QEMU_TESTS)" in skip) exit 0 ;; auto) retry=3600 ;; require) retry=0 ;; \
	  *) echo "error: QEMU_TESTS=$(QEMU_TESTS): use auto, require or skip" >&2; exit 2 ;; esac; \
	if QEMU_RETRY_AFTER=$$retry scripts/qemu/build-qemu >/dev/null && \
	  scripts/qemu/build-guest >/dev/null; then :; \
	elif [ "$(QEMU_TESTS)" = require ]; then \
	  echo "error: could not build QEMU or the guest (QEMU_TESTS=require)" >&2; exit 1; \
	else echo "warning: no QEMU/guest built; tests/qemu will be skipped" >&2; fi

# libvfio-user's protocol-0.1 sample client and server (tests/interop), built once from the
# libvfio-user bundled in QEMU's source package (scripts/lvu/build-lvu-samples: ~10 s, plus a
# 38 MB download when build-qemu left no source behind). The same QEMU_TESTS decides whether
# a failed build skips those tests (auto, and no retry for an hour), fails (require) or is
# not tried (skip).
lvu-samples:
	@case "$(QEMU_TESTS)" in skip) exit 0 ;; auto) retry=3600 ;; require) retry=0 ;; \
	  *) echo "error: QEMU_TESTS=$(QEMU_TESTS): use auto, require or skip" >&2; exit 2 ;; esac; \
	if LVU_RETRY_AFTER=$$retry scripts/lvu/build-lvu-samples >/dev/null; then :; \
	elif [ "$(QEMU_TESTS)" = require ]; then \
	  echo "error: could not build libvfio-user's samples (QEMU_TESTS=require)" >&2; exit 1; \
	else echo "warning: no libvfio-user samples built; tests/interop will be skipped" >&2; fi

unit: $(STAMP) qemu-guest lvu-samples
	VFIO_USER_EMU_QEMU_TESTS=$(QEMU_TESTS) $(BIN)/python -m pytest -q

test: lint typecheck unit

# Fuzz the live server for FUZZ_SECONDS (coverage-guided with atheris when it installs,
# else a seeded PRNG), then the migration stream parser (C and Python paths) with
# FUZZ_EXAMPLES hypothesis examples per property.
FUZZ_SECONDS ?= 60
FUZZ_EXAMPLES ?= 1000
fuzz: $(STAMP)
	@$(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[fuzz]' \
	  || echo "atheris does not install here: fuzzing with a seeded PRNG"
	$(BIN)/python -m emulator.tools.fuzz --engine auto --seconds $(FUZZ_SECONDS)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -p no:cacheprovider \
	  tests/devices/migration/test_stream_fuzz.py tests/protocol/test_fuzz_codecs.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	rm -f devices/migration/fastpath/_fastpath*.so
