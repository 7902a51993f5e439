# nodeproxy developer entry points.  Every target first converges the machine (missing apt
# packages, .venv, editable install when pyproject.toml changed), so a second run is fast.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nodeproxy-installed
APT_PACKAGES := iptables nftables iproute2 tcpdump openssl socat procps psmisc haproxy iperf3 util-linux \
	python3-bpfcc curl nghttp2-client wrk linux-headers-amd64 bpftool etcd-server etcd-client
# Debian's bcc is exposed to the venv alone (a .pth naming a directory that holds only a `bcc`
# symlink), never the rest of Debian's dist-packages.
BCC_DIR := $(VENV)/debian-bcc
PYTEST_ARGS ?=
# Vagrant multi-VM suite (docs/vagrant.md): host packages, extra pytest args for tests/vagrant.
VAGRANT_APT_PACKAGES := vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients \
	qemu-system-x86 qemu-utils mmdebstrap extlinux syslinux-common dnsmasq-base fdisk e2fsprogs
VAGRANT_PYTEST_ARGS ?=

.PHONY: demo test test-unit test-privileged lint bench deps apt clean test-vagrant

deps: apt $(STAMP)

apt:
	@scripts/ensure-apt.sh $(APT_PACKAGES)
	@scripts/ensure-bcc-headers.sh

$(VENV)/bin/python:
	@echo "==> creating $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	@echo "==> installing nodeproxy (editable) with test extras"
	@$(VENV)/bin/pip install -q -e '.[test]'
	@mkdir -p $(BCC_DIR) && ln -sfn /usr/lib/python3/dist-packages/bcc $(BCC_DIR)/bcc
	@$(PY) -c 'import site,os; open(os.path.join(site.getsitepackages()[0], "debian-bcc.pth"), "w").write(os.path.abspath("$(BCC_DIR)") + "\n")'
	@touch $(STAMP)

lint: deps
	@echo "==> ruff"
	@$(VENV)/bin/ruff check .
	@echo "==> mypy"
	@$(VENV)/bin/mypy ztunnel_cfg nodeproxy redirect cli tests meshlab linuxns
	@echo "==> import direction (lint-imports)"
	@$(VENV)/bin/lint-imports

test: lint
	@echo "==> pytest"
	@$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: deps
	@$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

# Multi-VM cluster (3 TCG VMs): box build (cached), up, provision, tests/vagrant, teardown.
test-vagrant: deps
	@NPV_APT_PACKAGES="$(VAGRANT_APT_PACKAGES)" NPV_PYTEST_ARGS="$(VAGRANT_PYTEST_ARGS)" \
		scripts/vagrant/run-suite.sh

demo: deps
	@$(VENV)/bin/nodeproxy demo $(DEMO_ARGS)

bench: deps
	@$(PY) -m tests.bench.run

# Soak: hold 10,000 HBONE tunnels through a real 2-node lab mesh (one agent process per node,
# iptables capture; root), release them (tests/bench/soak.py --lab).  SOAK_ARGS adds options,
# e.g. SOAK_ARGS="--json soak.json"; the in-process mode is `$(PY) -m tests.bench.soak`.
.PHONY: soak
soak: deps
	@$(PY) -m tests.bench.soak --lab --tunnels 10000 $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
