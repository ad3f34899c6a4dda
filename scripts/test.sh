#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite: lint, type check, and every test.
# Extra arguments go to pytest, e.g. scripts/test.sh -k rotation
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh test
bin=$root/.venv/bin
echo "== ruff"; "$bin/ruff" check src tests
echo "== mypy"; "$bin/mypy"
echo "== pytest"; exec "$bin/pytest" "$@"
