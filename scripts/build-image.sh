#!/usr/bin/env bash
# Builds kleidi's OCI image without a Docker daemon and without pulling from any registry:
#   - a root filesystem unpacked (dpkg -x) from Debian 12 packages fetched with `apt-get download`:
#     python3.11 and exactly the shared libraries that it, its stdlib modules and the wheels link to
#     (found with ldd, mapped to packages with dpkg -S), plus the TPM TCTI libraries tpm2-pytss loads and
#     Debian's CA certificates (the trust store the Vault backend uses over https);
#   - kleidi's wheel built from this checkout and its dependencies with the vault, pkcs11 and tpm extras,
#     installed with pip at the versions in .venv (the versions the test suite ran);
#   - packed with umoci: user 10001:10001, entrypoint /usr/bin/kleidi, workdir /, OCI labels, no shell,
#     no apt/dpkg/pip; timestamps from SOURCE_DATE_EPOCH (the last commit's time unless set).
# Outputs (shared convention, <v> from pyproject.toml):
#   dist/kleidi-<v>.oci.tar        OCI archive, one tag: <v>
#   dist/kleidi-<v>.sbom.cdx.json  CycloneDX SBOM of the image's Python environment (cyclonedx-py)
#   dist/kleidi-<v>.debs.txt       the Debian packages in the image, name and exact version
#   dist/kleidi-<v>-py3-none-any.whl
# A copy is kept under ~/.cache/kleidi/image/<hash of all inputs>/: a second run with no change is instant.
# Prints the archive's path last. Needs root (dpkg -x keeps root ownership), apt, umoci, the venv.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
py=$repo/.venv/bin/python
# One build at a time per machine (tests and helpers may ask at once; they share dist/ and the cache).
mkdir -p "${KUBE_APISERVER_CACHE:-$HOME/.cache/kleidi}"
exec 9>"${KUBE_APISERVER_CACHE:-$HOME/.cache/kleidi}/image.lock"
flock 9
[ -x "$py" ] || { echo "build-image.sh: $py missing; run scripts/setup.sh test first" >&2; exit 1; }
for tool in umoci apt-get dpkg dpkg-query ldd; do
  command -v "$tool" >/dev/null || { echo "build-image.sh: $tool is required (scripts/system-packages.sh)" >&2; exit 1; }
done
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
[ -n "$version" ] || { echo "build-image.sh: no version in pyproject.toml" >&2; exit 1; }
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
source_url=${IMAGE_SOURCE_URL:-https://github.com/kleidi-kms/kleidi}
dist=$repo/dist
# The runtime pins: the versions of kleidi's dependencies installed in .venv (what the tests ran).
pins=$("$py" -m pip freeze --exclude-editable 2>/dev/null | grep -v '^#' | sort)
# Everything the image is made of goes into the cache key.
inputs_hash=$(
  {
    echo "$version $revision $SOURCE_DATE_EPOCH $source_url"
    echo "$pins"
    cat /var/lib/apt/lists/*Release 2>/dev/null | sha256sum  # the Debian package versions apt would fetch
    git ls-files -co --exclude-standard src pyproject.toml README.md LICENSE scripts/build-image.sh deploy/image \
      | grep -v __pycache__ | sort | while read -r f; do [ -f "$f" ] && sha256sum "$f"; done
  } | sha256sum | cut -c1-16
)
cache=${KUBE_APISERVER_CACHE:-$HOME/.cache/kleidi}/image/$inputs_hash
archive=kleidi-$version.oci.tar
sbom=kleidi-$version.sbom.cdx.json
debs=kleidi-$version.debs.txt
wheel=kleidi-$version-py3-none-any.whl
mkdir -p "$dist"
if [ -f "$cache/$archive" ] && [ -f "$cache/$sbom" ] && [ -f "$cache/$wheel" ] && [ -f "$cache/$debs" ]; then
  cp "$cache/$archive" "$cache/$sbom" "$cache/$wheel" "$cache/$debs" "$dist/"
  echo "image: cached ($inputs_hash), $(du -h "$dist/$archive" | cut -f1) archive" >&2
  echo "$dist/$archive"
  exit 0
fi

work=$(mktemp -d /tmp/kleidi-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
mkdir -p "$rootfs" "$work/debs" "$work/wheels"

echo "image: building kleidi $version wheel" >&2
"$py" -m pip wheel --quiet --no-deps --wheel-dir "$work/wheels" "$repo" >&2
cp "$work/wheels/$wheel" "$work/$wheel"

# Debian packages (apt's candidate version, security updates included): unpack one (and remember it) unless already there.
declare -A unpacked=()
unpack_deb() {
  local pkg=$1 ver
  [ -n "${unpacked[$pkg]:-}" ] && return 0
  (cd "$work/debs" && apt-get download -q=2 -o APT::Sandbox::User=root "$pkg" >&2)
  dpkg -x "$work/debs/${pkg}_"*.deb "$rootfs"
  ver=$(dpkg-deb -f "$work/debs/${pkg}_"*.deb Version)
  unpacked[$pkg]=$ver
}
echo "image: unpacking python3.11 from Debian packages" >&2
for pkg in python3.11-minimal libpython3.11-minimal libpython3.11-stdlib \
           libtss2-tcti-device0 libtss2-tcti-swtpm0 libtss2-tcti-mssim0 libtss2-tctildr0; do
  unpack_deb "$pkg"
done
# CA certificates: the Vault backend verifies its server with the system trust store (Python's ssl default
# paths, OpenSSL's /usr/lib/ssl/cert.pem) unless backend.tls.ca_file is set. Debian's ca-certificates ships
# the certificates; the bundle is made by its postinst (update-ca-certificates, not run here), so build it
# the same way: every certificate /etc/ca-certificates.conf enables by default (all of mozilla/).
unpack_deb ca-certificates
mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/usr/lib/ssl"
find "$rootfs/usr/share/ca-certificates" -name '*.crt' -print0 | sort -z | xargs -0 cat \
  > "$rootfs/etc/ssl/certs/ca-certificates.crt"
[ -s "$rootfs/etc/ssl/certs/ca-certificates.crt" ] || { echo "build-image.sh: no CA certificates" >&2; exit 1; }
ln -sfn /etc/ssl/certs/ca-certificates.crt "$rootfs/usr/lib/ssl/cert.pem"
ln -sfn /etc/ssl/certs "$rootfs/usr/lib/ssl/certs"
site=$rootfs/usr/lib/python3/dist-packages
mkdir -p "$site"

echo "image: installing kleidi[vault,pkcs11,tpm] and its dependencies" >&2
echo "$pins" | grep -v -i '^kleidi' > "$work/constraints.txt"
# tpm2-pytss has no binary wheel on PyPI: pip builds it against libtss2-dev (once; pip caches the wheel).
"$py" -m pip install --quiet --no-compile --no-warn-script-location --only-binary :all: \
  --no-binary tpm2-pytss --constraint "$work/constraints.txt" --target "$site" \
  "$work/$wheel[vault,pkcs11,tpm]" >&2

echo "image: trimming" >&2
stdlib=$rootfs/usr/lib/python3.11
rm -rf "$site/bin" "$site"/pip "$site"/pip-* "$site"/setuptools "$site"/setuptools-* "$site"/_distutils_hack \
  "$site"/distutils-precedence.pth \
  "$stdlib"/{test,idlelib,tkinter,turtledemo,ensurepip,lib2to3,pydoc_data,distutils/tests,venv} \
  "$stdlib"/lib-dynload/{readline,_curses,_curses_panel,_dbm,_gdbm,nis,_sqlite3,_tkinter}.*so \
  "$stdlib"/sqlite3 "$stdlib"/curses "$stdlib"/dbm "$stdlib"/turtle.py \
  "$rootfs"/usr/share/{doc,man,info,locale,lintian,bug,gdb,pixmaps,applications,binfmts,python3} \
  "$rootfs"/usr/include "$rootfs"/usr/lib/x86_64-linux-gnu/pkgconfig "$rootfs"/etc/python3.11/sitecustomize.py
find "$rootfs" -depth -name __pycache__ -type d -exec rm -rf {} +
find "$site" -depth -type d \( -name tests -o -name test \) -exec rm -rf {} +
find "$rootfs" \( -name '*.pyc' -o -name '*.a' -o -name '*.h' -o -name '*.pxd' -o -name '*.pyx' \) -delete

# Shared libraries: whatever python, its stdlib modules and the wheels' extensions link to, transitively.
echo "image: resolving shared libraries" >&2
while :; do
  missing=$(
    find "$rootfs" -type f \( -name '*.so' -o -name '*.so.*' -o -path '*/usr/bin/python3.11' \) -print0 \
      | { xargs -0 -r ldd 2>/dev/null || true; } | awk '/=> \// {print $3}' | sort -u \
      | while read -r lib; do
          [ -e "$rootfs$lib" ] || [ -e "$rootfs/usr$lib" ] || [ -e "$rootfs${lib#/usr}" ] || echo "$lib"
        done || true
  )
  new=0
  for lib in $missing; do
    case $lib in */site-packages/*|*/dist-packages/*|"$rootfs"*) continue;; esac
    pkg=$( { dpkg -S "$lib" 2>/dev/null || dpkg -S "/usr$lib" 2>/dev/null || dpkg -S "${lib#/usr}" 2>/dev/null \
             || dpkg -S "$(readlink -f "$lib")" 2>/dev/null || true; } | head -1 | cut -d: -f1)
    [ -n "$pkg" ] || { echo "build-image.sh: no Debian package owns $lib" >&2; exit 1; }
    if [ -z "${unpacked[$pkg]:-}" ]; then unpack_deb "$pkg"; new=1; fi
  done
  [ "$new" = 1 ] || break
done

# No shell, no package manager, no other programs: only the interpreter and kleidi's entry point.
find "$rootfs/usr/bin" "$rootfs/usr/sbin" "$rootfs/bin" "$rootfs/sbin" -mindepth 1 \
  ! -name python3.11 -exec rm -rf {} + 2>/dev/null || true
rm -rf "$rootfs"/usr/share/{doc,man,info,locale,lintian,bug,gdb} "$rootfs"/usr/include \
  "$rootfs"/usr/lib/x86_64-linux-gnu/{gconv,audit,pkgconfig} "$rootfs"/usr/libexec "$rootfs"/var \
  "$rootfs"/etc/{init.d,default,ld.so.conf.d,logrotate.d,cron.daily} "$rootfs"/usr/lib/tmpfiles.d
ln -sfn python3.11 "$rootfs/usr/bin/python3"
cat > "$rootfs/usr/bin/kleidi" <<'EOF'
#!/usr/bin/python3.11 -I
# kleidi's console script (kleidi = "kleidi.cli:main"); -I: no PYTHON* environment, no user site.
import sys

from kleidi.cli import main

if __name__ == "__main__":
    sys.exit(main())
EOF
chmod 0755 "$rootfs/usr/bin/kleidi"
# Minimal /etc so that getpwuid and name lookups work for the fixed user; /tmp for Python's tempfile.
mkdir -p "$rootfs/etc" "$rootfs/tmp" "$rootfs/var/run/kleidi" "$rootfs/var/lib/kleidi" "$rootfs/etc/kleidi"
printf 'root:x:0:0:root:/root:/nonexistent\nkleidi:x:10001:10001:kleidi:/nonexistent:/nonexistent\n' \
  > "$rootfs/etc/passwd"
printf 'root:x:0:\nkleidi:x:10001:\n' > "$rootfs/etc/group"
printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
chmod 1777 "$rootfs/tmp"
chown -R 0:0 "$rootfs"
chmod -R go-w "$rootfs"
chmod 1777 "$rootfs/tmp"
find "$rootfs" -perm /6000 -type f -exec chmod ug-s {} +
# Smoke test before packing: the interpreter and kleidi start inside the root filesystem.
chroot "$rootfs" /usr/bin/kleidi --version >&2

echo "image: SBOM (cyclonedx-py over the image's Python environment)" >&2
# The image's interpreter, run from the build directory, finds its own stdlib and dist-packages
# relative to itself (prefix = $rootfs/usr); cyclonedx-py asks it for its installed distributions.
"$repo/.venv/bin/cyclonedx-py" environment --output-format JSON --spec-version 1.6 --output-reproducible \
  --output-file "$work/$sbom" "$rootfs/usr/bin/python3.11" >&2
for pkg in $(printf '%s\n' "${!unpacked[@]}" | sort); do echo "$pkg ${unpacked[$pkg]}"; done > "$work/$debs"
find "$rootfs" -depth -name __pycache__ -type d -exec rm -rf {} +

echo "image: packing with umoci" >&2
find "$rootfs" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
layout=$work/oci
umoci init --layout "$layout"
umoci new --image "$layout:$version"
umoci unpack --image "$layout:$version" "$work/bundle" >/dev/null
rm -rf "$work/bundle/rootfs"
mv "$rootfs" "$work/bundle/rootfs"
umoci repack --no-history --image "$layout:$version" "$work/bundle"
label() { printf -- '--config.label=org.opencontainers.image.%s=%s' "$1" "$2"; }
umoci config --no-history --image "$layout:$version" --created "$created" \
  --author "kleidi maintainers" --os linux --architecture amd64 \
  --config.user 10001:10001 --config.workingdir / \
  --config.entrypoint /usr/bin/kleidi --config.cmd serve --config.cmd --config --config.cmd /etc/kleidi/config.yaml \
  --clear config.env --config.env PATH=/usr/bin --config.env PYTHONDONTWRITEBYTECODE=1 \
  "$(label version "$version")" "$(label revision "$revision")" "$(label created "$created")" \
  "$(label source "$source_url")" "$(label licenses Apache-2.0)" "$(label title kleidi)" \
  "$(label description "KMS v2 provider plugin for Kubernetes")" \
  --manifest.annotation "org.opencontainers.image.version=$version" \
  --manifest.annotation "org.opencontainers.image.revision=$revision"
umoci gc --layout "$layout"
find "$layout" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
  -C "$layout" -cf "$work/$archive" .

mkdir -p "$cache.tmp"
cp "$work/$archive" "$work/$sbom" "$work/$wheel" "$work/$debs" "$cache.tmp/"
rm -rf "$cache" && mv "$cache.tmp" "$cache"
cp "$cache/$archive" "$cache/$sbom" "$cache/$wheel" "$cache/$debs" "$dist/"
echo "image: built ($inputs_hash): $(du -h "$dist/$archive" | cut -f1) archive," \
  "$(du -sh "$work/bundle/rootfs" | cut -f1) unpacked" >&2
echo "$dist/$archive"
