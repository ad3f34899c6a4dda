#!/usr/bin/env bash
# Signs and verifies kleidi's release artifacts (the wheel, the OCI image archive, its SBOM) with a
# cosign key pair, offline: no Fulcio certificate, no Rekor transparency-log entry (see
# docs/deploy/supply-chain.md for why and for what that leaves out).
#
# Usage:
#   scripts/sign-artifacts.sh keygen DIR            # writes DIR/kleidi.key (encrypted) and DIR/kleidi.pub
#   scripts/sign-artifacts.sh sign KEY FILE...      # writes FILE.sig beside each FILE
#   scripts/sign-artifacts.sh verify PUB FILE...    # checks each FILE against FILE.sig; exit 1 on any failure
#   scripts/sign-artifacts.sh cosign                # prints the path of the cosign binary (builds it once)
#
# The private key's password comes from COSIGN_PASSWORD in the environment, never from argv; keygen and
# sign refuse to run without it. COSIGN=/path/to/cosign uses that binary instead of the cached build.
set -euo pipefail
cd "$(dirname "$0")/.."

COSIGN_MODULE=github.com/sigstore/cosign/v2@v2.6.5

usage() { sed -n '6,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

cosign_bin() {
  if [ -n "${COSIGN:-}" ]; then echo "$COSIGN"; return; fi
  scripts/build-go-tool.sh cosign "$COSIGN_MODULE" github.com/sigstore/cosign/v2/cmd/cosign
}

need_password() {
  [ -n "${COSIGN_PASSWORD+set}" ] \
    || { echo "set COSIGN_PASSWORD in the environment (the key's password; never pass it as an argument)" >&2; exit 2; }
}

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
case $cmd in
  cosign)
    cosign_bin
    ;;
  keygen)
    dir=${1:?usage: sign-artifacts.sh keygen DIR}
    need_password
    cosign=$(cosign_bin)
    mkdir -p "$dir"
    if [ -e "$dir/kleidi.key" ] || [ -e "$dir/kleidi.pub" ]; then
      echo "$dir/kleidi.key or kleidi.pub exists already; refusing to overwrite a signing key" >&2
      exit 1
    fi
    (umask 077 && cd "$dir" && "$cosign" generate-key-pair --output-key-prefix kleidi >/dev/null)
    chmod 600 "$dir/kleidi.key"
    echo "$dir/kleidi.key"
    echo "$dir/kleidi.pub"
    ;;
  sign)
    key=${1:?usage: sign-artifacts.sh sign KEY FILE...}
    shift
    [ $# -gt 0 ] || usage
    need_password
    cosign=$(cosign_bin)
    for file in "$@"; do
      [ -f "$file" ] || { echo "no such file: $file" >&2; exit 1; }
      "$cosign" sign-blob --yes --key "$key" --tlog-upload=false --output-signature "$file.sig" "$file" \
        >/dev/null 2>"$file.sig.log" || { cat "$file.sig.log" >&2; rm -f "$file.sig.log"; exit 1; }
      rm -f "$file.sig.log"
      echo "$file.sig"
    done
    ;;
  verify)
    pub=${1:?usage: sign-artifacts.sh verify PUB FILE...}
    shift
    [ $# -gt 0 ] || usage
    cosign=$(cosign_bin)
    status=0
    for file in "$@"; do
      if [ ! -f "$file.sig" ]; then
        echo "FAIL $file: no signature $file.sig" >&2
        status=1
      elif "$cosign" verify-blob --key "$pub" --signature "$file.sig" --insecure-ignore-tlog=true "$file" \
          >/dev/null 2>&1; then
        echo "OK   $file"
      else
        echo "FAIL $file: signature does not verify with $pub" >&2
        status=1
      fi
    done
    exit $status
    ;;
  *)
    usage
    ;;
esac
