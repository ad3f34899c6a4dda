#!/usr/bin/env bash
# Set up (first run only) and run kleidi on the local backend, for trying it out.
# The keyring and socket live in ./.kleidi/ (created on first run, mode 0700/0600); SERVE_DIR moves them.
# (Not KLEIDI_*: kleidi reads every KLEIDI_* variable as a setting and stops on one it does not know.)
# Extra arguments go to `kleidi serve`, e.g. scripts/serve.sh --log-level debug
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh" runtime
state=${SERVE_DIR:-$root/.kleidi}
mkdir -p -m 0700 "$state"
echo "kleidi: socket unix://$state/kleidi.sock, keyring $state/keyring.json (Ctrl-C stops)" >&2
exec "$root/.venv/bin/kleidi" serve --endpoint "unix://$state/kleidi.sock" --keyring "$state/keyring.json" \
  --create-keyring "$@"
