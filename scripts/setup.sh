#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a virtualenv in .venv with kleidi installed (editable).
# Usage: scripts/setup.sh [runtime|test]   (test adds the test tools; default runtime)
# Re-running is fast: pip is only called when pyproject.toml changed since the last install.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
profile=${1:-runtime}
venv=$root/.venv
python=${PYTHON:-python3}

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "kleidi needs Python >= 3.11 (found: $("$python" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
extras=""
if [ "$profile" = test ]; then
  extras="[test]"
  "$root/scripts/system-packages.sh"  # SoftHSM2, swtpm; libtss2-dev before pip builds tpm2-pytss
fi
stamp="$venv/.kleidi-installed-$profile"
want=$(cat "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)
# the test profile installs everything the runtime one does
if [ "$profile" = runtime ] && [ -f "$venv/.kleidi-installed-test" ] && [ "$(cat "$venv/.kleidi-installed-test")" = "$want" ]; then
  exit 0
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root$extras"
  echo "$want" > "$stamp"
fi
if [ "$profile" = test ]; then
  "$root/scripts/build-test-deps.sh"  # kube-apiserver, kubelet, helm, cosign, kleidi's image (cached)
fi
