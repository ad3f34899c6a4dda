#!/usr/bin/env bash
# The Debian packages the tests and extras need, installed only if missing: SoftHSM2 and opencryptoki
# (PKCS#11 tokens), swtpm and tpm2-tools (a software TPM 2.0), libtss2-dev (tpm2-pytss, the tpm extra,
# compiles against it); umoci, podman, runc and containerd (the container image is built without a
# daemon, run rootless, and run by a real kubelet), systemd (systemd-analyze checks the unit), gcc
# (the kubelet's pause image is compiled from source). Idempotent; a no-op when all are there.
set -euo pipefail
packages=(softhsm2 opencryptoki swtpm swtpm-tools tpm2-tools libtss2-dev
          umoci podman runc containerd skopeo systemd gcc libc6-dev)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo=sudo
if ! command -v apt-get >/dev/null; then
  echo "missing system packages: ${missing[*]} (install them with your distribution's package manager)" >&2
  exit 1
fi
echo "installing system packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
