#!/usr/bin/env bash
# Fresh-machine check (make fresh-machine): runs the README's two commands in a fresh clone of
# this repository's HEAD with every cache empty, and reports how long each phase took.
#
#   1. make dev   started in the background until its controller answers /readyz, then stopped
#                 (SIGTERM, as Ctrl-C would), which must leave no cluster behind
#   2. make test  every test against a cluster of its own, stopped afterwards
#
# Empty, in a temporary directory: HOME (so ~/.cache: Go's build cache, the policy build cache),
# CARGO_HOME (crates are downloaded again), CARGO_TARGET_DIR, GOCACHE, GOMODCACHE (Go modules
# come from the module proxy), SBX_CLUSTER_CACHE and the clone's .dev. Kept: the toolchains
# (RUSTUP_HOME, go on PATH) and Go's settings file (GOENV). Everything it starts is stopped on
# exit, and the temporary directory is deleted (--keep keeps it). The logs of make dev and
# make test and cargo's --timings reports are kept in FRESH_REPORT_DIR, and the build's time is
# summarised by crate (deploy/local/cargo-timings.py).
#
# Takes 30+ minutes on 2 cores: run it on demand, not from CI.
#
#   deploy/local/fresh-machine.sh [--control-plane-only] [--keep]
#
#   --control-plane-only   only clone, `cluster.sh up` with a cold control-plane build, `down`,
#                          and `up`/`down` once more with the binary cached (with SBX_RUNNER_BIN
#                          set, the executor runner reuses that binary instead of a cold cargo build)
#   --keep                 keep the temporary directory (its path is printed)
#
# Environment: FRESH_DIR (parent of the temporary directory, default $TMPDIR or /tmp; needs
# ~15 GB), FRESH_REPORT_DIR (where logs and build reports are kept, default
# <repo>/.dev/fresh-machine/<time>), SBX_PORT_BASE (passed on), FRESH_READY_TIMEOUT (seconds for
# make dev to get its controller ready, default 3600).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
readonly here repo

only_cp=0 keep=0
while (($#)); do
	case "$1" in
	--control-plane-only) only_cp=1 ;;
	--keep) keep=1 ;;
	*)
		sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
		exit 2
		;;
	esac
	shift
done

t_start=$(date +%s)
log() { printf '[fresh %5ss] %s\n' "$(($(date +%s) - t_start))" "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

for tool in git make cargo go curl setsid flock; do
	command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH"
done

parent="${FRESH_DIR:-${TMPDIR:-/tmp}}"
mkdir -p "$parent"
avail_kb="$(df -Pk "$parent" | awk 'NR == 2 {print $4}')"
((avail_kb > 15 * 1024 * 1024)) || die "$parent has $((avail_kb / 1024 / 1024)) GB free; the check needs ~15 GB (set FRESH_DIR)"
work="$(mktemp -d "$parent/sbx-fresh.XXXXXX")"
report_dir="${FRESH_REPORT_DIR:-$repo/.dev/fresh-machine/$(date -u +%Y%m%dT%H%M%SZ)}"
src="$work/src"
dev_pid=""
results=()

# ------------------------------------------------------------------ cleanup --
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	if [[ -n "$dev_pid" ]] && kill -0 "$dev_pid" 2>/dev/null; then
		log "stopping make dev (process group $dev_pid)"
		kill -TERM -- "-$dev_pid" 2>/dev/null
		wait "$dev_pid" 2>/dev/null
	fi
	if [[ -x "$src/deploy/local/cluster.sh" ]]; then
		SBX_DEV_DIR="$src/.dev" "$src/deploy/local/cluster.sh" down >/dev/null 2>&1
	fi
	report
	keep_reports
	if ((keep)); then
		log "kept $work"
	else
		# The Go module cache is read-only by design.
		chmod -R u+w "$work" 2>/dev/null
		rm -rf "$work"
	fi
	log "finished with exit code $rc"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

report() {
	((${#results[@]})) || return 0
	printf '\n%-44s %8s  %s\n' "phase" "seconds" "result" >&2
	local line
	for line in "${results[@]}"; do
		IFS='|' read -r phase secs result <<<"$line"
		printf '%-44s %8s  %s\n' "$phase" "$secs" "$result" >&2
	done
	printf '\n' >&2
}

# The logs and cargo's build reports outlive the temporary directory, with a summary of where
# the build time went.
keep_reports() {
	mkdir -p "$report_dir"
	cp -f "$work"/make-*.log "$report_dir"/ 2>/dev/null
	cp -f "$work"/cargo-target/cargo-timings/cargo-timing-*.html "$report_dir"/ 2>/dev/null
	local html
	for html in "$report_dir"/cargo-timing-*.html; do
		[[ -f "$html" ]] || continue
		if command -v python3 >/dev/null 2>&1; then
			python3 "$repo/deploy/local/cargo-timings.py" "$html" >&2
		fi
	done
	log "logs and build reports kept in $report_dir"
}

# phase NAME COMMAND...: runs COMMAND, records its time and outcome; fails the script if it fails.
phase() {
	local name="$1" t0 rc=0
	shift
	log "phase: $name"
	t0=$(date +%s)
	"$@" || rc=$?
	results+=("$name|$(($(date +%s) - t0))|$( ((rc == 0)) && echo ok || echo "FAILED ($rc)")")
	((rc == 0)) || die "phase '$name' failed with exit code $rc"
}

# ---------------------------------------------------------------- isolation --
# Go's settings (GOPROXY, GOFLAGS, ...) are configuration, not cache: keep them.
GOENV="$(go env GOENV)"
export GOENV
export RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}"
export HOME="$work/home"
export XDG_CACHE_HOME="$HOME/.cache" XDG_CONFIG_HOME="$HOME/.config"
export CARGO_HOME="$work/cargo-home"
export CARGO_TARGET_DIR="$work/cargo-target"
export GOCACHE="$work/go-build" GOMODCACHE="$work/go-mod" GOPATH="$work/go"
export SBX_CLUSTER_CACHE="$work/sbx-cluster"
export SBX_DEV_DIR="$src/.dev"
# cargo reports where the cold build's time goes (kept in the report directory).
export SBX_CARGO_TIMINGS=1
unset KUBECONFIG SBX_KUBECONFIG SANDBOX_POLICY_TARGET_DIR
mkdir -p "$HOME" "$CARGO_HOME" "$CARGO_TARGET_DIR" "$GOCACHE" "$GOMODCACHE" "$SBX_CLUSTER_CACHE"
log "temporary directory $work (HOME, CARGO_HOME, CARGO_TARGET_DIR, GOCACHE, GOMODCACHE, SBX_CLUSTER_CACHE)"

clone() {
	git clone --quiet --no-hardlinks "$repo" "$src"
	git -C "$src" checkout --quiet --detach "$(git -C "$repo" rev-parse HEAD)"
	log "cloned $(git -C "$src" log -1 --format='%h %s')"
	git -C "$repo" diff --quiet HEAD || log "note: uncommitted changes in $repo are not part of the check"
}
phase "fresh clone" clone
cd "$src"

# ------------------------------------------------------------ control plane --
if ((only_cp)); then
	# `up` builds the control plane itself, as on a first `make dev`: the build must not count
	# against SBX_UP_TIMEOUT.
	phase "cluster.sh up (cold control-plane build)" deploy/local/cluster.sh up
	phase "cluster.sh status" deploy/local/cluster.sh status
	phase "cluster.sh down" deploy/local/cluster.sh down
	phase "cluster.sh up again (cached binary)" deploy/local/cluster.sh up
	phase "cluster.sh down" deploy/local/cluster.sh down
	exit 0
fi

# ------------------------------------------------------------------ make dev --
dev_log="$work/make-dev.log"
ready_timeout="${FRESH_READY_TIMEOUT:-3600}"

# Ready once dev.sh's controller answers /readyz on the health port it was given.
controller_ready() {
	local port
	port="$(sed -n 's|.*health http://127.0.0.1:\([0-9]*\)/readyz.*|\1|p' "$dev_log" | tail -n1)"
	[[ -n "$port" ]] && [[ "$(curl --silent --max-time 2 "http://127.0.0.1:$port/readyz" 2>/dev/null)" == ready ]]
}

make_dev_until_ready() {
	log "make dev (log: $dev_log)"
	setsid make dev </dev/null >"$dev_log" 2>&1 &
	dev_pid=$!
	local deadline=$(($(date +%s) + ready_timeout)) last=0 now
	until controller_ready; do
		kill -0 "$dev_pid" 2>/dev/null || {
			tail -n 30 "$dev_log" >&2
			return 1
		}
		now=$(date +%s)
		if ((now >= deadline)); then
			tail -n 30 "$dev_log" >&2
			log "make dev: no ready controller after ${ready_timeout}s"
			return 1
		fi
		if ((now - last >= 60)); then
			log "make dev: waiting for the controller; last line: $(tail -n1 "$dev_log" | cut -c1-140)"
			last=$now
		fi
		sleep 1
	done
	log "make dev: controller ready; $(grep -o 'built .* in [0-9]*s' "$dev_log" | head -n1 || true)"
	log "make dev: $(grep -o 'ready in [0-9]*s ([^)]*)' "$dev_log" | head -n1 || true)"
}

stop_make_dev() {
	kill -TERM -- "-$dev_pid"
	local rc=0
	wait "$dev_pid" || rc=$?
	dev_pid=""
	log "make dev exited with $rc after SIGTERM"
	# It must have taken its cluster down with it.
	if deploy/local/cluster.sh status >/dev/null 2>&1; then
		log "make dev left its cluster running"
		return 1
	fi
	local left
	left="$(find "$SBX_DEV_DIR/run" -name '*.pid' 2>/dev/null | wc -l)"
	((left == 0)) || {
		log "make dev left pid files: $(ls "$SBX_DEV_DIR/run")"
		return 1
	}
}

phase "make dev: until the controller is ready" make_dev_until_ready
phase "make dev: stop (SIGTERM) and tear down" stop_make_dev

# ----------------------------------------------------------------- make test --
test_log="$work/make-test.log"
make_test() {
	log "make test (log: $test_log)"
	local rc=0
	make test </dev/null > >(tee "$test_log" | grep --line-buffered -E '^(test result|\[dev\]|\[cluster\]|build.sh)' >&2) 2>&1 || rc=$?
	local passed failed
	passed="$(sed -n 's/^test result: .* \([0-9]*\) passed.*/\1/p' "$test_log" | awk '{ n += $1 } END { print n + 0 }')"
	failed="$(sed -n 's/^test result: .* \([0-9]*\) failed.*/\1/p' "$test_log" | awk '{ n += $1 } END { print n + 0 }')"
	log "make test exited with $rc: $passed passed, $failed failed (summed over the test binaries)"
	if deploy/local/cluster.sh status >/dev/null 2>&1; then
		log "make test left its cluster running"
		return 1
	fi
	return "$rc"
}
phase "make test" make_test
