#!/usr/bin/env bash
# Benchmarks (issue #6): set up (first run only), then run every scenario and regenerate
# docs/benchmarks.md from bench/results/latest.json. `--quick` is a short run for development that
# writes bench/results/quick.{json,md} only. Needs Go (the load generator, kube-apiserver).
# Usage: scripts/bench.sh [--quick] [--skip ceiling|local|openbao|apiserver] [--no-profile]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh test >&2
scripts/build-kube-apiserver.sh "${KUBE_VERSION:-v1.36.3}" >/dev/null
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
BENCH_COMMAND="scripts/bench.sh" exec "$root/.venv/bin/python" -m bench "$@"
