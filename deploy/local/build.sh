#!/usr/bin/env bash
# Builds the sbx-cluster multi-call binary (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kwok, kubectl) and prints its path.
#
# The binary is cached in ${SBX_CLUSTER_CACHE:-$HOME/.cache/sbx-cluster}/<hash>/
# where <hash> covers go.mod, go.sum, every *.go file of this module, the Go
# version and the build flags (not this script's text), so unchanged sources
# never rebuild and several git worktrees share one binary. Go's own build
# cache (GOCACHE, ~/.cache/go-build by default) makes rebuilds after small
# changes fast. A cold build takes ~10-20 min on 2 cores; while it runs, a
# "still building (N s)" line appears every SBX_BUILD_TICK seconds (default 30).
#
# Usage: deploy/local/build.sh [--print-hash]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${SBX_CLUSTER_CACHE:-${HOME}/.cache/sbx-cluster}"

export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:--mod=readonly}"

command -v go >/dev/null 2>&1 || {
	echo "build.sh: 'go' not found on PATH (need Go >= 1.26; see README.md)" >&2
	exit 1
}

cd "$here"
go_version="$(go env GOVERSION)"
k8s_version="v1.36.3"
etcd_version="$(sed -n 's,^[[:space:]]*go.etcd.io/etcd/server/v3 \(v[^ ]*\).*,\1,p' go.mod | head -n1)"
pkg_cb="k8s.io/component-base/version"
pkg_cg="k8s.io/client-go/pkg/version"
ldflags="-s -w"
for pkg in "$pkg_cb" "$pkg_cg"; do
	ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=36 -X $pkg.gitTreeState=clean"
done
hash="$(
	{
		echo "$go_version $(go env GOOS)/$(go env GOARCH) CGO_ENABLED=$CGO_ENABLED"
		echo "go build -trimpath -ldflags '$ldflags'"
		# Sorted so the hash does not depend on directory order.
		find . -maxdepth 1 -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print |
			LC_ALL=C sort | while read -r f; do
			echo "== $f"
			cat "$f"
		done
	} | sha256sum | cut -c1-16
)"
if [[ "${1:-}" == "--print-hash" ]]; then
	echo "$hash"
	exit 0
fi
for pkg in "$pkg_cb" "$pkg_cg"; do
	ldflags+=" -X $pkg.gitCommit=sbx-cluster-$hash"
done

out_dir="$cache_root/$hash"
bin="$out_dir/sbx-cluster"
if [[ -x "$bin" ]]; then
	touch -c "$bin" # marks it as in use for the pruning below
	echo "$bin"
	exit 0
fi

# ticker_start MESSAGE: prints "build.sh: MESSAGE (N s)" every SBX_BUILD_TICK seconds until
# ticker_stop, so a long first build is never silent.
ticker=""
ticker_start() {
	local msg="$1" t0
	t0=$(date +%s)
	# $$ is this script even inside the subshell: the ticker ends with it.
	(
		trap - EXIT
		while sleep "${SBX_BUILD_TICK:-30}" && kill -0 $$ 2>/dev/null; do
			echo "build.sh: $msg ($(($(date +%s) - t0)) s)" >&2
		done
	) </dev/null >/dev/null 9>&- &
	ticker=$!
}
ticker_stop() {
	if [[ -n "$ticker" ]]; then
		kill "$ticker" 2>/dev/null || true
		wait "$ticker" 2>/dev/null || true
		ticker=""
	fi
}
tmp=""
trap 'ticker_stop; [[ -z "$tmp" ]] || rm -f "$tmp"' EXIT

mkdir -p "$out_dir"
# Serialise concurrent builds (parallel test binaries, several worktrees).
exec 9>"$out_dir/.lock"
if ! flock -n 9; then
	echo "build.sh: another build of sbx-cluster $hash is running (lock $out_dir/.lock); waiting for it" >&2
	ticker_start "still waiting for the other build of sbx-cluster $hash"
	flock 9
	ticker_stop
fi
if [[ -x "$bin" ]]; then
	echo "$bin"
	exit 0
fi

gocache="$(go env GOCACHE)"
if [[ -n "$(find "$gocache" -maxdepth 2 -name '*-a' -print -quit 2>/dev/null)" ]]; then
	estimate="with a warm Go build cache ($gocache) this takes 10-60 s, or 10-20 min if the cache holds none of these packages"
else
	estimate="the Go build cache ($gocache) is empty, so this first build takes about 10 minutes on 2 cores (up to 20 on a busy machine); later builds reuse the cache"
fi
echo "build.sh: building sbx-cluster $hash with $go_version into $out_dir:" \
	"embedded etcd $etcd_version, Kubernetes $k8s_version (kube-apiserver, kube-controller-manager," \
	"kube-scheduler, kubectl) and kwok, from Go modules (missing ones are downloaded into" \
	"$(go env GOMODCACHE) first); $estimate" >&2
start=$(date +%s)
tmp="$out_dir/.sbx-cluster.tmp.$$"
ticker_start "still building sbx-cluster"
go build -trimpath -ldflags "$ldflags" -o "$tmp" .
ticker_stop
mv -f "$tmp" "$bin"
tmp=""
ln -sfn sbx-cluster "$out_dir/kubectl"
echo "build.sh: built $bin in $(($(date +%s) - start))s" >&2

# Binaries of other source versions unused for 14 days go (~140 MB each).
find "$cache_root" -mindepth 2 -maxdepth 2 -name sbx-cluster -mtime +14 -printf '%h\n' 2>/dev/null |
	while read -r old; do
		[[ "$old" != "$out_dir" ]] && rm -rf -- "$old" && echo "build.sh: pruned $old" >&2
	done || true
echo "$bin"
