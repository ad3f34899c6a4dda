#!/usr/bin/env bash
# Builds kube-apiserver VERSION from the Go module k8s.io/kubernetes (through the Go module proxy)
# in a throwaway module outside the repo, and caches the binary under ~/.cache/kleidi, so only the
# first build on a machine pays (a few minutes on 2 cores). Prints the binary's path.
#
# Usage: scripts/build-kube-apiserver.sh [VERSION]      (default: $KUBE_VERSION or v1.36.3)
#
# k8s.io/kubernetes requires its staging modules (k8s.io/api, k8s.io/apiserver, ...) at v0.0.0 and
# replaces them with ./staging paths; `go install ...@version` refuses such replace directives, so we
# require it from a module of our own and replace every staging module with its published v0.X.Y.
set -euo pipefail
version=${1:-${KUBE_VERSION:-v1.36.3}}
[[ $version =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || { echo "version must look like v1.36.3, got $version" >&2; exit 2; }
minor=${BASH_REMATCH[1]}
staging_version="v0.${minor}.${BASH_REMATCH[2]}"
cache=${KUBE_APISERVER_CACHE:-$HOME/.cache/kleidi}
out=$cache/kube-apiserver-$version
if [ -x "$out" ]; then echo "$out"; exit 0; fi
command -v go >/dev/null || { echo "go is required to build kube-apiserver" >&2; exit 1; }
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
export GOFLAGS=-mod=mod
go mod init kleidi.local/kube-apiserver-build >/dev/null 2>&1
echo "kube-apiserver $version: resolving modules (first build on this machine only)" >&2
gomod=$(go mod download -json "k8s.io/kubernetes@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
staging=$(grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk '{print $1}' | sort -u)
[ -n "$staging" ] || { echo "no staging replace directives found in k8s.io/kubernetes@$version go.mod" >&2; exit 1; }
{
  echo "require k8s.io/kubernetes $version"
  for module in $staging; do echo "replace $module => $module $staging_version"; done
} >> go.mod
cat > tools.go <<'GO'
package main

import _ "k8s.io/kubernetes/cmd/kube-apiserver/app"

func main() {}
GO
go mod tidy >/dev/null
echo "kube-apiserver $version: compiling (several minutes on 2 cores)" >&2
pkg=k8s.io/component-base/version
go build -o "$out.tmp" -ldflags "-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor \
  -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z" k8s.io/kubernetes/cmd/kube-apiserver
mv "$out.tmp" "$out"
echo "$out"
