#!/usr/bin/env bash
# Builds Kubernetes components at VERSION from the Go module k8s.io/kubernetes (through the Go module
# proxy) in a throwaway module outside the repo, and caches each binary under ~/.cache/kleidi, so only
# the first build on a machine pays (a few minutes each on 2 cores; later components reuse the modules).
# Prints each binary's path, one a line, in the order asked.
#
# Usage: scripts/build-kube.sh VERSION COMPONENT...
#   COMPONENT: kube-apiserver, kubelet, kube-scheduler or kube-controller-manager
#
# k8s.io/kubernetes requires its staging modules (k8s.io/api, k8s.io/apiserver, ...) at v0.0.0 and
# replaces them with ./staging paths; `go install ...@version` refuses such replace directives, so we
# require it from a module of our own and replace every staging module with its published v0.X.Y.
set -euo pipefail
version=${1:?usage: build-kube.sh VERSION COMPONENT...}
shift
[ $# -gt 0 ] || { echo "usage: build-kube.sh VERSION COMPONENT..." >&2; exit 2; }
[[ $version =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || { echo "version must look like v1.36.3, got $version" >&2; exit 2; }
minor=${BASH_REMATCH[1]}
staging_version="v0.${minor}.${BASH_REMATCH[2]}"
for component in "$@"; do
  case $component in
    kube-apiserver|kubelet|kube-scheduler|kube-controller-manager) ;;
    *) echo "unknown component $component (kube-apiserver, kubelet, kube-scheduler, kube-controller-manager)" >&2; exit 2 ;;
  esac
done
cache=${KUBE_APISERVER_CACHE:-$HOME/.cache/kleidi}
missing=()
for component in "$@"; do
  [ -x "$cache/$component-$version" ] || missing+=("$component")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v go >/dev/null || { echo "go is required to build ${missing[*]}" >&2; exit 1; }
  mkdir -p "$cache"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  cd "$work"
  export GOFLAGS=-mod=mod
  go mod init kleidi.local/kube-build >/dev/null 2>&1
  echo "kubernetes $version: resolving modules (first build on this machine only)" >&2
  gomod=$(go mod download -json "k8s.io/kubernetes@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  staging=$(grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk '{print $1}' | sort -u)
  [ -n "$staging" ] || { echo "no staging replace directives found in k8s.io/kubernetes@$version go.mod" >&2; exit 1; }
  {
    echo "require k8s.io/kubernetes $version"
    for module in $staging; do echo "replace $module => $module $staging_version"; done
  } >> go.mod
  {
    echo "package main"
    echo
    for component in "${missing[@]}"; do echo "import _ \"k8s.io/kubernetes/cmd/$component/app\""; done
    echo
    echo "func main() {}"
  } > tools.go
  go mod tidy >/dev/null
  pkg=k8s.io/component-base/version
  for component in "${missing[@]}"; do
    echo "kubernetes $version: compiling $component (several minutes on 2 cores)" >&2
    out=$cache/$component-$version
    go build -o "$out.tmp" -ldflags "-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor \
      -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z" "k8s.io/kubernetes/cmd/$component"
    mv "$out.tmp" "$out"
  done
fi
for component in "$@"; do echo "$cache/$component-$version"; done
