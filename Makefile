# zerosend: `make run` shows it working, `make test` runs every test. Both create .venv here.
VENV   := .venv
DIST   := dist
PY     := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))

.PHONY: run test test-rust test-python lint wheel bench bench-iscsi system-deps venv develop clean test-mutants mutants-full fuzz soak
# The dependencies of an extra of pyproject.toml, the one place they are listed (`test`: the
# tests and lints; `bench`: the benchmark's plots), read by the venv's python $(2). (A command
# substitution's words are not parsed again: `<` in a requirement stays a character.)
extra = $$($(2) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["$(1)"]))')

run: develop
	$(PY) -m bench.demo

test: system-deps develop test-rust lint test-python

system-deps:
	./scripts/install-system-deps.sh

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(call extra,test,$(PY))
	touch $@

venv: $(VENV)/.installed

develop: venv
	$(VENV)/bin/maturin develop --release --quiet

test-rust:
	cargo test -p zerosend --release
	cargo test -p zerosend-iscsi --release

lint: develop
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests bench examples
	$(VENV)/bin/ruff format --check python tests bench examples
	$(PY) -m mypy.stubtest zerosend._native zerosend.iscsi._native --allowlist tests/stubtest-allowlist.txt
	$(PY) -m mypy --strict python examples

test-python: develop
	$(PY) -m pytest -q

# The fuzz tests with a hundred times the examples of `make test`, random rather than fixed;
# what fails is kept in .hypothesis/ and replayed first next time.
fuzz: develop
	ZEROSEND_FUZZ=long $(PY) -m pytest -q --timeout=3600 --hypothesis-show-statistics \
		tests/iscsi/test_iscsi_fuzz.py

# The history checkers run long: `make soak SEED=7 MINUTES=30` runs each for MINUTES with that
# seed (CHECKER=core or CHECKER=iscsi runs one). A failing seed prints the command that replays it.
SEED ?= 1
MINUTES ?= 30
CHECKER ?= all
SOAK_TESTS_core := tests/test_history_core.py
SOAK_TESTS_iscsi := tests/iscsi/test_history_iscsi.py
SOAK_TESTS_all := $(SOAK_TESTS_core) $(SOAK_TESTS_iscsi)
soak: system-deps develop
	ZEROSEND_SOAK_SEED=$(SEED) ZEROSEND_SOAK_MINUTES=$(MINUTES) $(PY) -m pytest -q -x \
		$(SOAK_TESTS_$(CHECKER))

wheel: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" maturin build --release --zig --compatibility manylinux2014 --out $(DIST)

# Release: the sdist; the pure-Python wheel made from it (where no platform wheel fits); a
# schema check of the release workflow (check-jsonschema from PyPI).
.PHONY: sdist pure-wheel lint-release
sdist: venv
	$(VENV)/bin/maturin sdist --out $(DIST)

pure-wheel: sdist
	$(PY) scripts/pure_wheel.py $(DIST)

$(VENV)/.release-tools: $(VENV)/.installed
	$(PY) -m pip install -q "check-jsonschema>=0.29"
	touch $@

lint: lint-release
lint-release: $(VENV)/.release-tools
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(VENV)/bin/ruff check scripts
	$(VENV)/bin/ruff format --check scripts

# The core benchmark (about 15 minutes on 2 CPUs): BENCHMARKS.md, plots, targets met / not met;
# then UDP GSO on the ifb device (bench/senders/gso.py, root; about 2 minutes) into BENCHMARKS.md;
# then the iSCSI target against tgtd (root; about 8 minutes), into bench/iscsi/results.md.
# `make bench BENCH_ARGS=--quick` is a smoke run of seconds of the core benchmark alone; see
# `python -m bench --help` and `python bench/iscsi/perf.py --help`.
BENCH_ARGS ?=
ISCSI_BENCH_ARGS ?= --size 256M --seconds 8 --rounds 3 --markdown bench/iscsi/results.md
bench: system-deps develop
	$(PY) -m pip install -q $(call extra,bench,$(PY))
	$(PY) -m bench $(BENCH_ARGS)
	$(if $(findstring --quick,$(BENCH_ARGS)),,$(PY) -m bench.senders.gso)
	$(if $(findstring --quick,$(BENCH_ARGS)),,$(PY) bench/iscsi/perf.py $(ISCSI_BENCH_ARGS))

bench-iscsi: system-deps develop
	$(PY) bench/iscsi/perf.py $(ISCSI_BENCH_ARGS)

# Mutation controls: the extension built with deliberate faults (cargo feature "mutants", never
# in a release build) into its own venv and target directory; each fault must make a contract
# test fail (scripts/mutants.py prints which).
MUTANTS_VENV := .venv-mutants
$(MUTANTS_VENV)/.installed: pyproject.toml
	python3 -m venv $(MUTANTS_VENV)
	$(MUTANTS_VENV)/bin/python -m pip install -q --upgrade pip
	$(MUTANTS_VENV)/bin/python -m pip install -q $(call extra,test,$(MUTANTS_VENV)/bin/python)
	touch $@

# A wheel, not `maturin develop`: an editable install would put the faulty extension into
# python/zerosend/, where .venv's editable install would pick it up too.
test-mutants: system-deps $(MUTANTS_VENV)/.installed
	rm -rf target/mutants/wheels
	VIRTUAL_ENV=$(abspath $(MUTANTS_VENV)) CARGO_TARGET_DIR=target/mutants \
		$(MUTANTS_VENV)/bin/maturin build --release --quiet \
		--features mutants --out target/mutants/wheels
	$(MUTANTS_VENV)/bin/python -m pip install -q --force-reinstall --no-deps target/mutants/wheels/*.whl
	$(MUTANTS_VENV)/bin/python scripts/mutants.py

# cargo-mutants over the core crate, against its Rust tests (not in CI: about a minute per
# mutant on a small machine). FILES narrows it (FILES="tracker.rs region.rs"); every survivor
# is listed, with why it is acceptable, in rust/zerosend/mutants-survivors.md.
MUTANTS_REQUIRE := io_uring,msg_zerocopy,sysctl,nofile
mutants-full:
	command -v cargo-mutants >/dev/null || cargo install --locked cargo-mutants@27.1.0
	ZEROSEND_REQUIRE=$(MUTANTS_REQUIRE) cargo mutants -p zerosend -j 1 --output target/mutants-full \
		$(foreach f,$(FILES),-f rust/zerosend/src/$(f))

clean:
	rm -rf $(VENV) $(MUTANTS_VENV) target $(DIST)
