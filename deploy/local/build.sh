#!/usr/bin/env bash
# Builds the sbx-cluster multi-call binary (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kwok, kubectl) and prints its path.
#
# The binary is cached in ${SBX_CLUSTER_CACHE:-$HOME/.cache/sbx-cluster}/<hash>/
# where <hash> covers go.mod, go.sum, every *.go file of this module and the Go
# version, so unchanged sources never rebuild and several git worktrees share
# one binary. Go's own build cache (GOCACHE, ~/.cache/go-build by default)
# makes rebuilds after small changes fast. A cold build takes ~10-20 min on
# 2 cores.
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
hash="$(
	{
		echo "$go_version $(go env GOOS)/$(go env GOARCH) CGO_ENABLED=$CGO_ENABLED"
		# Sorted so the hash does not depend on directory order.
		find . -maxdepth 1 -type f \( -name '*.go' -o -name go.mod -o -name go.sum -o -name build.sh \) -print |
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

out_dir="$cache_root/$hash"
bin="$out_dir/sbx-cluster"
if [[ -x "$bin" ]]; then
	touch -c "$bin" # marks it as in use for the pruning below
	echo "$bin"
	exit 0
fi

mkdir -p "$out_dir"
# Serialise concurrent builds (parallel test binaries, several worktrees).
exec 9>"$out_dir/.lock"
if ! flock -n 9; then
	echo "build.sh: another build of $hash is running; waiting for it" >&2
	flock 9
fi
if [[ -x "$bin" ]]; then
	echo "$bin"
	exit 0
fi

k8s_version="v1.36.3"
pkg_cb="k8s.io/component-base/version"
pkg_cg="k8s.io/client-go/pkg/version"
ldflags="-s -w"
for pkg in "$pkg_cb" "$pkg_cg"; do
	ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=36"
	ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit=sbx-cluster-$hash"
done

echo "build.sh: building sbx-cluster ($hash) with $go_version; with a cold Go build cache this takes 10-20 minutes" >&2
start=$(date +%s)
tmp="$out_dir/.sbx-cluster.tmp.$$"
trap 'rm -f "$tmp"' EXIT
go build -trimpath -ldflags "$ldflags" -o "$tmp" .
mv -f "$tmp" "$bin"
ln -sfn sbx-cluster "$out_dir/kubectl"
echo "build.sh: built $bin in $(($(date +%s) - start))s" >&2

# Binaries of other source versions unused for 14 days go (~140 MB each).
find "$cache_root" -mindepth 2 -maxdepth 2 -name sbx-cluster -mtime +14 -printf '%h\n' 2>/dev/null |
	while read -r old; do
		[[ "$old" != "$out_dir" ]] && rm -rf -- "$old" && echo "build.sh: pruned $old" >&2
	done || true
echo "$bin"
