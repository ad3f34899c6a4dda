#!/usr/bin/env bash
# Builds a Go command from a module served by the Go module proxy, in a throwaway module outside the
# repo, and caches the binary as ~/.cache/kleidi/bin/NAME-VERSION, so only the first build on a machine
# pays. Prints the binary's path.
#
# Usage: scripts/build-go-tool.sh NAME MODULE@VERSION PACKAGE
#   e.g. scripts/build-go-tool.sh helm helm.sh/helm/v3@v3.22.0 helm.sh/helm/v3/cmd/helm
set -euo pipefail
name=${1:?usage: build-go-tool.sh NAME MODULE@VERSION PACKAGE}
module_version=${2:?usage: build-go-tool.sh NAME MODULE@VERSION PACKAGE}
package=${3:?usage: build-go-tool.sh NAME MODULE@VERSION PACKAGE}
[[ $module_version =~ ^([a-z0-9./_-]+)@(v[0-9]+\.[0-9]+\.[0-9]+)$ ]] \
  || { echo "MODULE@VERSION must look like helm.sh/helm/v3@v3.22.0, got $module_version" >&2; exit 2; }
version=${BASH_REMATCH[2]}
[[ $name =~ ^[a-z0-9-]+$ ]] || { echo "NAME must be lower-case letters, digits and dashes, got $name" >&2; exit 2; }
cache=${KUBE_APISERVER_CACHE:-$HOME/.cache/kleidi}/bin
out=$cache/$name-$version
if [ -x "$out" ]; then echo "$out"; exit 0; fi
command -v go >/dev/null || { echo "go is required to build $name" >&2; exit 1; }
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
export GOFLAGS=-mod=mod
go mod init "kleidi.local/$name-build" >/dev/null 2>&1
echo "$name $version: resolving modules (first build on this machine only)" >&2
go get "$module_version" >/dev/null 2>&1 || go get "$module_version"
echo "$name $version: compiling" >&2
CGO_ENABLED=0 go build -trimpath -o "$out.tmp" -ldflags "-s -w" "$package"
mv "$out.tmp" "$out"
echo "$out"
