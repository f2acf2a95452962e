# kpgen: every target depends on setup, which makes .venv; each target installs the Debian
# packages it needs itself (scripts/install-host-packages GROUP; idempotent).
VENV    := .venv
PYTHON  := $(VENV)/bin/python
KPGEN   := $(VENV)/bin/kpgen
STAMP   := $(VENV)/.kpgen-installed
SEED    := examples/seed-cluster.yaml
SEED_NODE_FLAGS := --hostname-override k8s-worker01 --cluster-cidr 192.168.0.0/16

.PHONY: setup test render golden bench lint clean vagrant-checks

setup: $(STAMP)

# Debian's /usr/bin/python3 with --system-site-packages: the only Python that imports
# python3-nftables (the libnftables binding).
$(STAMP): pyproject.toml scripts/install-host-packages
	scripts/install-host-packages venv
	test -x $(PYTHON) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

test: setup
	scripts/install-host-packages test
	$(PYTHON) -m pytest -q

# The Vagrant lab's static checks (tests/test_vagrant.py) with their tools installed (Ruby,
# ShellCheck, Vagrant and vagrant-libvirt): make test skips those it lacks; CI runs them all.
vagrant-checks: setup
	scripts/install-host-packages vagrant-checks
	KPGEN_REQUIRE_TOOLS=1 $(PYTHON) -m pytest -q tests/test_vagrant.py

render: setup
	$(KPGEN) render -f $(SEED) $(SEED_NODE_FLAGS)

# Regenerates tests/golden/ from tests/golden/cases.py; review the diff before committing.
golden: setup
	$(PYTHON) -m pytest -q tests/test_golden.py --update-golden

# About 2 minutes on 2 cores, one progress line per stage on stderr; Ctrl-C stops it and
# removes its child processes and temporary files.
bench: setup
	$(PYTHON) bench/render_bench.py

lint: setup
	$(PYTHON) -m pip install --quiet --disable-pip-version-check ruff mypy types-PyYAML
	$(PYTHON) -m ruff check kpgen tests bench
	$(PYTHON) -m mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

# The seed article's cluster in network namespaces (docs/lab.md): up, the article's curl
# loops, down again. Needs root.
.PHONY: lab
lab: setup
	scripts/install-host-packages lab
	$(KPGEN) lab demo
