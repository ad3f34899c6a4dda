#!/usr/bin/env bash
# Checks the exact Python packages an image ships (every pkg:pypi component of its CycloneDX SBOM,
# kleidi itself excepted) against PyPI's vulnerability data with pip-audit.
#
# Usage: scripts/audit-deps.sh SBOM.cdx.json [IGNORE_FILE]
#   IGNORE_FILE defaults to .pip-audit-ignore: one advisory id a line, each followed by "# why" (an
#   entry without a justification is refused).
#
# Exit codes:
#   0  every package was audited; no known vulnerability with a fix, except ignored ones (advisories
#      without a fix are printed as warnings)
#   1  a known vulnerability with a fixed version exists and is not ignored
#   2  usage error, unreadable SBOM or ignore file
#   3  the vulnerability database did not answer for at least one package: nothing is claimed
#      (pip-audit itself reports "No known vulnerabilities found" in that case; this script does not)
set -euo pipefail
cd "$(dirname "$0")/.."
sbom=${1:?usage: audit-deps.sh SBOM.cdx.json [IGNORE_FILE]}
ignore=${2:-.pip-audit-ignore}
python=${PYTHON:-.venv/bin/python}
pip_audit=${PIP_AUDIT:-$(dirname "$python")/pip-audit}
[ -x "$pip_audit" ] || { echo "pip-audit not found at $pip_audit (scripts/setup.sh test installs it)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" - "$sbom" "$work/requirements.txt" <<'EOF' || exit 2
import json, sys
from urllib.parse import unquote
sbom_path, out = sys.argv[1], sys.argv[2]
try:
    with open(sbom_path, encoding="utf-8") as f:
        sbom = json.load(f)
except (OSError, ValueError) as e:
    sys.exit(f"cannot read the SBOM {sbom_path}: {e}")
if sbom.get("bomFormat") != "CycloneDX":
    sys.exit(f"{sbom_path} is not a CycloneDX JSON SBOM")
pins = set()
def walk(components):
    for c in components or []:
        purl = c.get("purl") or ""
        if purl.startswith("pkg:pypi/") and "@" in purl:
            name, _, version = purl[len("pkg:pypi/"):].partition("@")
            name, version = unquote(name), unquote(version.split("?")[0].split("#")[0])
            if name.lower() != "kleidi":  # kleidi itself is not on PyPI; its code is this repository
                pins.add(f"{name}=={version}")
        walk(c.get("components"))
walk(sbom.get("components"))
if not pins:
    sys.exit(f"{sbom_path} lists no pkg:pypi components: nothing to audit")
with open(out, "w", encoding="utf-8") as f:
    f.write("".join(p + "\n" for p in sorted(pins)))
EOF

status=0
"$pip_audit" --requirement "$work/requirements.txt" --no-deps --disable-pip --vulnerability-service pypi \
  --cache-dir "$work/cache" --progress-spinner off --format json --output "$work/report.json" 2>"$work/stderr" || status=$?

"$python" - "$work/requirements.txt" "$work/report.json" "$work/stderr" "$ignore" "$status" <<'EOF'
import json, re, sys
reqs, report_path, stderr_path, ignore_path, status = sys.argv[1:6]
n = sum(1 for line in open(reqs, encoding="utf-8") if line.strip())
ignored: dict[str, str] = {}
try:
    lines = open(ignore_path, encoding="utf-8").read().splitlines()
except FileNotFoundError:
    lines = []
for number, line in enumerate(lines, 1):
    if not line.strip() or line.lstrip().startswith("#"):
        continue
    m = re.fullmatch(r"\s*(\S+)\s+#\s*(\S.*)", line)
    if not m:
        print(f"{ignore_path}:{number}: every ignored advisory needs a justification: 'ID  # why'", file=sys.stderr)
        sys.exit(2)
    ignored[m.group(1)] = m.group(2)
try:
    report = json.load(open(report_path, encoding="utf-8"))
except (OSError, ValueError):
    tail = open(stderr_path, encoding="utf-8", errors="replace").read().strip().splitlines()[-3:]
    print("vulnerability database unreachable: pip-audit produced no report (exit %s): %s"
          % (status, " | ".join(tail)), file=sys.stderr)
    sys.exit(3)
deps = report.get("dependencies", [])
unaudited = [d for d in deps if "skip_reason" in d]
if unaudited or len(deps) != n:
    names = ", ".join(d["name"] for d in unaudited[:5])
    print(f"vulnerability database unreachable: PyPI answered for {n - len(unaudited)} of {n} packages; "
          f"not audited: {names}{' ...' if len(unaudited) > 5 else ''}", file=sys.stderr)
    sys.exit(3)
failing, warned = [], []
for d in deps:
    for v in d.get("vulns", []):
        ids = [v["id"], *v.get("aliases", [])]
        label = f"{d['name']} {d['version']}: {v['id']}"
        if any(i in ignored for i in ids):
            print(f"ignored  {label} ({next(ignored[i] for i in ids if i in ignored)})")
        elif v.get("fix_versions"):
            failing.append(f"{label}, fixed in {', '.join(v['fix_versions'])}")
        else:
            warned.append(f"{label}, no fixed version yet")
for w in warned:
    print(f"warning  {w}")
for f in failing:
    print(f"VULNERABLE {f}", file=sys.stderr)
print(f"audited {n} packages against PyPI's vulnerability data: {len(failing)} fixable, "
      f"{len(warned)} without a fix")
sys.exit(1 if failing else 0)
EOF
