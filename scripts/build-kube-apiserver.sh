#!/usr/bin/env bash
# Builds (first time) or finds kube-apiserver VERSION in ~/.cache/kleidi; prints the binary's path.
# Usage: scripts/build-kube-apiserver.sh [VERSION]      (default: $KUBE_VERSION or v1.36.3)
set -euo pipefail
exec "$(dirname "$0")/build-kube.sh" "${1:-${KUBE_VERSION:-v1.36.3}}" kube-apiserver
