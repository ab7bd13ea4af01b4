# The two commands a newcomer needs:  make demo   and   make test
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= $(CURDIR)/.venv
export PATH := $(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export INFERD_TESTHOST_IMAGE = $(shell scripts/testhost-image.sh --name 2>/dev/null)
DEMO_HOST ?= inferd-demo
STAGE = scripts/stage.sh
export STAGE_TIMES := $(CURDIR)/.cache/stage-times.txt

.PHONY: setup demo demo-down bundle test lint clean

setup:
	@scripts/setup.sh

demo: setup
	@scripts/demo-assets.sh .cache/demo
	@scripts/testhost-up.sh $(DEMO_HOST) >/dev/null
	ansible-playbook site.yml -i inventory/demo
	@scripts/demo-report.sh $(DEMO_HOST)

# Everything an air-gapped GPU host needs, built where the network is (see inventory/bank/files/README.md):
#   make bundle BUNDLE_OPTS='--torch cuda --model PACKED_DIR --deb grafana_12.0.0_amd64.deb'
BUNDLE_DIR ?= inventory/bank/files/bundle
BUNDLE_OPTS ?=
bundle: setup
	@scripts/bundle.sh $(BUNDLE_OPTS) $(BUNDLE_DIR)

demo-down:
	@scripts/testhost-down.sh $(DEMO_HOST)

# Every check, each stage timed so drift shows. CI runs exactly this (.ci/run). The two pytest
# suites run on two workers (pytest-xdist): most of their time is servers and subprocesses waiting;
# each lists its 15 slowest tests.
test: setup
	@mkdir -p .cache && rm -f $(STAGE_TIMES)
	@$(STAGE) ruff         'ruff check . && ruff format --check .'
	@$(STAGE) ansible-lint ansible-lint --profile production
	@$(STAGE) repo         pytest -q -n 2 --durations=15 tests --ignore=tests/modules --ignore=tests/image
	@$(STAGE) runtime      pytest -q -n 2 --durations=15 runtime/tests
	@if compgen -G 'library/*.py' >/dev/null; then $(STAGE) modules pytest -q tests/modules; fi
	@$(STAGE) image        pytest -q tests/image
	@$(STAGE) molecule     scripts/molecule-all.sh
	@$(STAGE) --summary

lint:
	ruff check . && ruff format --check . && ansible-lint --profile production

clean: demo-down
	scripts/testhost-down.sh --all
