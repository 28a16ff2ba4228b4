# Developer entry points. See README.md ("Quick start", "Local control plane").
#
#   make dev        cluster + CRDs + controller in the foreground; Ctrl-C stops everything
#   make dev-up     the same in the background;  make dev-down  stops it
#   make test       every test (unit + e2e) against one local cluster, stopped afterwards
#   make sdk        OpenSandbox's server + Python SDK next to the running cluster; prints the exports
#                   (eval "$$(make -s sdk)"; python examples/sdk/batch_example.py)   make sdk-down stops it
#   make crds       regenerate crds/*.yaml from the Rust types
#   make policies   rebuild the policy components and refresh policies/prebuilt/ (commit them)
#   make bench      claim benchmarks (release build) against the cluster in $$KUBECONFIG or .dev
#   make bench-plots  SVG plots of the benchmark's latency distributions (docs/bench/)
#   make chaos      fault suite: controller behind a fault proxy, kills, apiserver restart, rolling
#                   update; prints figures (docs/chaos.md). CHAOS_ARGS='--seed N' replays a run
#   make image      container images sandbox-controller and sandbox-task-executor (buildah, podman or docker)
#   make fresh-machine  README's make dev + make test in a fresh clone with empty caches (30+ min)
#
# The kubeconfig is $(DEV_DIR)/kubeconfig:  export KUBECONFIG=$$(pwd)/.dev/kubeconfig

SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

DEV_DIR := $(or $(SBX_DEV_DIR),$(CURDIR)/.dev)
CARGO ?= cargo
# Extra arguments for cargo test, e.g. make test TEST_ARGS='--test e2e crds'
TEST_ARGS ?=

.PHONY: help dev dev-up dev-down dev-status test crds cluster-build bench bench-plots chaos policies image fresh-machine sdk sdk-down

help:
	@sed -n 's/^#   //p' $(firstword $(MAKEFILE_LIST))

dev:
	deploy/local/dev.sh fg

dev-up:
	deploy/local/dev.sh up

dev-down:
	deploy/local/dev.sh down

dev-status:
	deploy/local/cluster.sh status

test:
	deploy/local/dev.sh test $(TEST_ARGS)

# OpenSandbox's lifecycle server (PyPI, in a virtual environment cached under ~/.cache/sbx-sdk) on
# 127.0.0.1 next to the cluster of `make dev`; stdout is only the exports, so `eval "$$(make -s sdk)"`.
sdk:
	@deploy/opensandbox/sdk.sh up

sdk-down:
	@deploy/opensandbox/sdk.sh down

crds:
	$(CARGO) build --quiet --workspace --all-targets
	"$${CARGO_TARGET_DIR:-target}/debug/sandbox-controller" crdgen

# Builds (or finds in ~/.cache/sbx-cluster) the control-plane binary only.
cluster-build:
	deploy/local/build.sh

policies:
	SANDBOX_POLICY_UPDATE_PREBUILT=1 $(CARGO) build --quiet --workspace --all-targets
	@ls -l policies/prebuilt

# Claim benchmarks: release build, against a running cluster without a controller of its own
# (deploy/local/cluster.sh up; the bench refuses to run beside make dev-up's controller).
# BENCH_ARGS='--runs 5', '--scale --json docs/bench/after.json' (docs/benchmarks.md)
BENCH_ARGS ?=
bench:
	$(CARGO) build --release --workspace --bins
	KUBECONFIG="$${KUBECONFIG:-$(DEV_DIR)/kubeconfig}" "$${CARGO_TARGET_DIR:-target}/release/sandbox-bench" $(BENCH_ARGS)

# SVG plots (CDFs) of docs/bench/before.json and, when present, docs/bench/after.json into
# docs/bench/. BENCH_PLOT_FILES='a.json b.json' plots other files.
BENCH_PLOT_FILES ?= docs/bench/before.json $(wildcard docs/bench/after.json)
bench-plots:
	$(CARGO) build --release --workspace --bins
	"$${CARGO_TARGET_DIR:-target}/release/sandbox-bench" plot --out docs/bench $(BENCH_PLOT_FILES)

# Fault suite against a cluster of its own (.dev-chaos), stopped afterwards: 1,000 batches over four
# scenarios, 20 kills, 90 s stalls; about 10-15 minutes on 2 cores. Fails only on broken
# invariants, leaks or batches that never converge. CHAOS_ARGS='--seed 42 --scenarios faults'
CHAOS_ARGS ?=
chaos:
	src/devtools/chaos.sh $(CHAOS_ARGS)

# Release images from static (musl) binaries, FROM scratch; see deploy/images/build.sh for
# IMAGE_BUILDER, IMAGE_PREFIX, IMAGE_TAG and EXECUTOR_BASE.
image:
	deploy/images/build.sh

# On demand only (not CI): a fresh clone, empty cargo/Go/cluster caches, timed phases.
fresh-machine:
	deploy/local/fresh-machine.sh
