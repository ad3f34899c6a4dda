"""The quickstart and the backend pages, run as written: every fenced block is run, checked or listed here.

Pages: docs/quickstart.md then docs/backends/local.md in one session (local.md goes on from the control
plane the quickstart set up), docs/backends/vault.md in another. A user copies each block into a
terminal; so does this test, block by block in page order, in one bash session per page set (``export``
and ``cd`` carry over), on a pty like a terminal (kleidi logs its console format there, as the pages
show). Each command block runs under ``set -e``: any failing command fails the test.

Every fenced block is preceded by exactly one directive comment, ``<!-- doc-test: KIND [key=value ...] -->``:

``run``                 a shell block, run as described above. Options:
                        ``bg=NAME``     a long-running command (``kleidi serve``, a dev server), left running
                                        under NAME, as in a terminal of its own; ``ready=REGEX`` waits for it.
                        ``stop=NAMES``  Ctrl-C (SIGINT to the process group) the named background commands
                                        first, as the page tells the user to.
                        ``exit=N``      the exit code the page promises (default 0).
                        ``quiet``       the page says it prints nothing: it must not.
                        ``retry=S``     re-run until it exits 0, for up to S seconds (a check the page says
                                        turns true after a while).
                        ``before=HOOK`` a step of the page the test must do itself (HOOKS below).
``output``              what the page says the previous ``run`` printed (stdout and stderr, as a terminal
                        shows them). Every line of the block, normalised (``normalise``: key_id digests,
                        times, tokens' TTLs...), must appear in the output, in order; lines starting ``$ ``
                        are the command. Options: ``lines=A-B`` checks only those lines of the block;
                        ``source=bg:NAME`` or ``source=journal:UNIT`` reads a background command's output
                        or a systemd unit's log (polled until it matches); ``file=PATH`` a file's content;
                        ``scenario=NAME`` the output of SCENARIOS[NAME], a failure the page describes
                        without a command for it.
``file path=PATH``      the block is the content of PATH: written there (its parent must exist).
``edit path=PATH at=S`` a YAML fragment that replaces the keys it names in section S of the YAML file PATH.
``config [at=S]``       a kleidi config (or a fragment of its section S, merged into the page's current
                        /etc/kleidi/config.yaml): ``kleidi config check`` must accept it.
``apiserver-config``    kube-apiserver flags (a manifest excerpt): the page's kube-apiserver is started with
                        exactly those ``--flags`` (plus the harness's own: etcd, certificates, ports).
``key-id-format``       a key_id pattern (``<version>``, ``<digest>``): every key_id printed so far matches it.
``skip``                cannot run here at all: listed in UNRUNNABLE with the reason (and counted).

Mappings (MAPPED_DIRS, ``Session.subst``): the host paths the pages use (/etc/kleidi, /var/lib/kleidi,
/var/run/kleidi, /etc/kubernetes, /etc/systemd/system, /root, /usr/local/bin, /src...) are rewritten to
the same paths under a temporary root in every command and file, and back in every output before it is
compared; fixed ports and hosts (the Vault dev server's 127.0.0.1:8200, kubeadm's etcd on
https://127.0.0.1:2379, the apiserver at https://10.0.0.10:6443) become the test's free ports. Stand-ins
on PATH: ``kleidi`` is this checkout's (/usr/local/bin/kleidi, as after quickstart 2.2); ``systemctl``
runs a unit's ExecStart (paths mapped) in the background as the unit's User and Group (uid and gid from
the temporary root's /etc/passwd, no supplementary groups, through setpriv) with its UMask, makes its
RuntimeDirectory (under the root's /var/run, with RuntimeDirectoryMode, owned by that user, and
$RUNTIME_DIRECTORY), logs to a journal file, ``reload`` runs ExecReload (it returns once the service
logs that it serves, where real systemd would return at once); ``systemd-sysusers`` and
``systemd-tmpfiles`` are the real ones with ``--root`` set to the temporary root, so the user ``kleidi``
exists only in the root's /etc/passwd; ``runuser -u USER --`` and ``chown`` take user and group names
from there (through setpriv and numeric ids), since the host does not know them;
``vault`` is the ``bao`` CLI (vault.md says they take the same commands); ``etcdctl`` and ``kubectl``
come from the venv (the test extra), as the quickstart tells trial users; kubectl finds the apiserver
through KUBECONFIG, as on a kubeadm node. etcd runs as kubeadm runs it (client TLS with client
certificates under /etc/kubernetes/pki), kube-apiserver is the e2e harness's (tests/e2e/cluster.py),
OpenBao is the real ``bao server -dev`` the page starts.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import fcntl
import json
import os
import pty
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from kleidi._crypto import kmsv2_storage as storage
from kleidi._proto.kmsv2 import api_pb2 as v2_pb
from kleidi._proto.kmsv2 import api_pb2_grpc as v2_grpc
from tests.e2e.cluster import ETCD, ETCDCTL, Etcd, KubeAPIServer, kube_apiserver_binary
from tests.support import free_port
from tests.vault.openbao import LocalCA

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PAGES = {name: ROOT / "docs" / name for name in ("quickstart.md", "backends/local.md", "backends/vault.md")}

# Host paths the pages use, each rewritten to <temporary root><path>.
MAPPED_DIRS = ("/etc/kleidi", "/etc/kubernetes", "/etc/systemd/system", "/etc/sysusers.d", "/etc/tmpfiles.d",
               "/var/lib/kleidi", "/var/run/kleidi", "/var/log/kleidi", "/root", "/usr/local/bin", "/opt/kleidi",
               "/src")
_MAPPED = re.compile(r"(?<![\w.~-])(" + "|".join(re.escape(d) for d in MAPPED_DIRS) + r")(?![\w.-])")

# Blocks that cannot run here at all, by page and first line, with the reason. Every block marked
# ``skip`` must be listed, and only those: a new unrunnable block has to be added here, with its reason.
UNRUNNABLE: dict[tuple[str, str], str] = {
    ("quickstart.md", "python3 -m venv /opt/kleidi"):
        "installs kleidi and its dependencies from the package index into a new venv; the test runs the "
        "checkout's .venv, which scripts/setup.sh installs the same way",
    ("quickstart.md", "for node in cp2 cp3; do"):
        "copies the keyring to other control-plane nodes over SSH; the test has one node",
    ("backends/local.md", "# 1. Rotate a working copy, not the live keyring."):
        "rotates across several control-plane nodes over SSH; the test has one node",
    ("backends/vault.md", "healthz: Vault login failed (AppRoleAuth): Vault answered 400: source address "
                          "\"127.0.0.1\" unauthorized by CIDR restrictions on the role: %!w(<nil>)"):
        "Status of a kleidi whose secret_id is bound to other addresses; not reproduced here (tests/vault covers "
        "refused logins)",
    ("backends/vault.md", "vault write auth/jwt/config oidc_discovery_url=https://issuer.example.com \\"):
        "needs an OIDC issuer that Vault can reach (the test configures the other variant, a public key)",
    ("backends/vault.md", "  serviceAccountName: kleidi"):
        "a Pod spec: the harness runs kube-apiserver without kubelet, so no pod runs",
    ("backends/vault.md", "healthz: Vault login failed (CertAuth): Vault answered 400: no chain matching all "
                          "constraints could be found for this login certificate"):
        "needs an HTTPS listener that asks for client certificates; the page's dev server listens on HTTP "
        "(tests/vault covers cert auth)",
    ("backends/vault.md", "02:13:21 INFO    logged in to Vault (AppRoleAuth); token valid for 30s"):
        "a two-minute run with 30-second tokens revoked under load (tests/vault/test_vault_backend.py runs it "
        "with 3-second tokens)",
    ("backends/vault.md", "02:08:33 WARNING Decrypt failed: key_id kleidi:vault:v1:VmWTAvSosAIIVJ2CmkM4NcUceG2iJ-gJ"
                          " has been retired; its ciphertexts can no longer be decrypted  method=Decrypt uid=doc "
                          "code=FAILED_PRECONDITION latency_ms=0.092"):
        "the log of a Decrypt for a retired version, which the page's apiserver never sends (the seed is in its "
        "cache); tests/vault covers it",
    ("backends/vault.md", "$ kleidi status --endpoint unix:///var/run/kleidi/kleidi.sock"):
        "Status after a Transit key restored from an older backup (flip-flop guard), and after Vault stopped: "
        "both destroy the dev server state the later blocks use; tests/vault covers both",
    ("backends/vault.md", "02:09:29 WARNING Transit key kubernetes was re-created (version creation times changed)"):
        "follows the restore of an older key backup (see the flip-flop guard above)",
    ("backends/vault.md", "Transit key <key> is of type rsa-2048, which cannot bind associated data: ciphertexts "
                          "are not bound to their key_id and annotations; prefer aes256-gcm96, or set "
                          "server.envelope_format: 2"):
        "a message template (<key>), logged for an RSA key the page does not create",
    ("backends/vault.md", "healthz: Transit key sig is of type ed25519, which cannot encrypt; fix: use an "
                          "aes256-gcm96 key"):
        "Status for a signing key the page does not create (tests/vault covers key types)",
    ("backends/vault.md", "vault write transit/restore/kubernetes backup=@kubernetes.backup"):
        "restores into a server that lacks the key; on the page's server the key exists and the restore is "
        "refused (force=true would overwrite it)",
}
UNRUNNABLE_COUNT = 14  # len(UNRUNNABLE), written out: a new unrunnable block must be listed on purpose


# ------------------------------------------------------------------------------------------------ the pages


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    kind: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def first_line(self) -> str:
        return self.text.splitlines()[0] if self.text else ""

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test:\s*(.*?)\s*-->\s*$")


def parse_page(page: str) -> list[Block]:
    lines = PAGES[page].read_text().split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, lang = fence.groups()
        end = i + 1
        while not re.match(r"^\s*```\s*$", lines[end]):
            end += 1
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:end]]
        prev = i - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        directive = _DIRECTIVE.match(lines[prev]) if prev >= 0 else None
        kind, options = "", {}
        if directive:
            words = shlex.split(directive.group(1))
            kind = words[0]
            for word in words[1:]:
                key, _, value = word.partition("=")
                options[key] = value
        blocks.append(Block(page, i + 1, lang, "\n".join(body), kind, options))
        i = end + 1
    return blocks


KINDS = {"run", "output", "file", "edit", "config", "apiserver-config", "key-id-format", "skip"}


def test_every_block_is_run_checked_or_listed() -> None:
    skipped: set[tuple[str, str]] = set()
    for page in PAGES:
        blocks = parse_page(page)
        assert blocks, page
        for block in blocks:
            assert block.kind in KINDS, f"{block.where}: no <!-- doc-test: ... --> directive before this block " \
                                        f"(or an unknown kind {block.kind!r}); see tests/docs/test_docs_run.py"
            if block.kind == "skip":
                skipped.add((page, block.first_line))
            if block.kind == "output" and "scenario" in block.options:
                assert block.options["scenario"] in SCENARIOS, f"{block.where}: unknown scenario"
            if "before" in block.options:
                assert block.options["before"] in HOOKS, f"{block.where}: unknown hook"
    assert skipped == set(UNRUNNABLE), (
        f"marked skip but not listed: {sorted(skipped - set(UNRUNNABLE))}; "
        f"listed but not marked skip: {sorted(set(UNRUNNABLE) - skipped)}")
    assert len(UNRUNNABLE) == UNRUNNABLE_COUNT


def test_no_script_or_page_uses_a_kleidi_variable_that_is_not_a_setting() -> None:
    """kleidi reads every KLEIDI_* variable as a setting and stops on an unknown one: a script's own
    variable under that prefix stops kleidi for whoever sets it (KLEIDI_DEV_DIR did)."""
    import typing

    from kleidi.config import KleidiSettings

    allowed = {"KLEIDI_CONFIG"}

    def models(annotation: Any) -> Iterator[Any]:
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            yield annotation
        for argument in typing.get_args(annotation):
            yield from models(argument)

    def walk(model: Any, prefix: str) -> None:
        for name, info in model.model_fields.items():
            env = f"{prefix}{name.upper()}"
            allowed.add(env)
            for sub in models(info.annotation):
                walk(sub, env + "__")

    walk(KleidiSettings, "KLEIDI_")
    files = [*sorted((ROOT / "scripts").iterdir()), *sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md",
             *sorted((ROOT / ".ci").iterdir())]
    found = {(path.relative_to(ROOT).as_posix(), name) for path in files if path.is_file()
             for name in re.findall(r"\bKLEIDI_[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="replace"))}
    # configuration.md and vault.md name these to say that they are not settings, or are ignored
    explained = {"KLEIDI_SERVICE_HOST", "KLEIDI_SERVICE_PORT", "KLEIDI_PORT", "KLEIDI_METRICS", "KLEIDI_VAULT_TOKEN",
                 "KLEIDI_SERVICE"}
    bad = sorted((path, name) for path, name in found if name not in allowed and name not in explained)
    assert not bad, f"KLEIDI_* names that are no setting: {bad}"


# ------------------------------------------------------------------------------------------------ output checks

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\r")
_NORMALISE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(kleidi:(?:local|vault):v\d+:)[A-Za-z0-9_-]{32}"), r"\1<digest>"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)?"), "<timestamp>"),
    (re.compile(r"\b\d\d:\d\d:\d\d\b"), "<time>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"), "<uuid>"),
    (re.compile(r"\b1\d{9}\b"), "<unix-time>"),
    (re.compile(r"\b(valid|renewed) for \d+s"), r"\1 for <n>s"),
    (re.compile(r"latency_ms=[\d.]+"), "latency_ms=<n>"),
    (re.compile(r"\b(python|grpcio) \d+(?:\.\d+)*"), r"\1 <version>"),
    (re.compile(r'"key": "[A-Za-z0-9+/]{43}="'), '"key": "<base64 of 32 random bytes>"'),
    (re.compile(r'apiserver_id_hash="[^"]*"'), 'apiserver_id_hash="…"'),
    (re.compile(r"\s+"), " "),
]


def normalise(line: str) -> str:
    for pattern, replacement in _NORMALISE:
        line = pattern.sub(replacement, line)
    return line.strip()


def _json_line(line: str) -> dict[str, Any] | None:
    if not line.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _line_matches(want: str, have: str) -> bool:
    wanted = _json_line(want)
    if wanted is not None:  # a JSON log record: the fields the page shows, in any order ("..." = any value)
        got = _json_line(have)
        return got is not None and all(
            k in got and (v == "..." or normalise(json.dumps(v)) == normalise(json.dumps(got[k])))
            for k, v in wanted.items())
    return normalise(want) == normalise(have)


def mismatch(shown: str, printed: str, lines: str | None = None) -> str | None:
    """None if every line the page shows appears in what was printed, in order; else the first missing line."""
    doc_lines = shown.splitlines()
    if lines:
        first, _, last = lines.partition("-")
        doc_lines = doc_lines[int(first) - 1:int(last or first)]
    wanted = [line for line in doc_lines if line.strip() and not line.startswith("$ ")]
    have = [line for line in printed.splitlines() if line.strip()]
    position = 0
    for want in wanted:
        while position < len(have) and not _line_matches(want, have[position]):
            position += 1
        if position == len(have):
            return want
        position += 1
    return None


KEY_ID = re.compile(r"kleidi:(?:local|vault):[A-Za-z0-9_:-]+")


# ------------------------------------------------------------------------------------------------ a terminal


class Terminal:
    """One command on its own pty (window 60x250, so nothing wraps), its output collected by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 250, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                     start_new_session=True)
        os.close(slave)
        self._master = master
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: every writer of the pty is gone
                break
            if not data:
                break
            self._chunks.append(data)

    def output(self) -> str:
        return _ANSI.sub("", b"".join(self._chunks).decode(errors="replace"))

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout:.0f}s; it printed:\n{self.output()}") from None
        self._reader.join(5)
        return code

    def interrupt(self, timeout: float = 20) -> int:
        """Ctrl-C: SIGINT to the foreground process group."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        self._reader.join(5)
        with contextlib.suppress(OSError):
            os.close(self._master)


# ------------------------------------------------------------------------------------------------ a control plane


class KubeadmEtcd(Etcd):
    """etcd as kubeadm runs it: client TLS, client certificates required, keys in /etc/kubernetes/pki."""

    def __init__(self, workdir: Path, pki: Path) -> None:
        super().__init__(workdir)
        self.url = f"https://127.0.0.1:{self.port}"
        ca = LocalCA(workdir / "ca", "etcd-ca", common_name="etcd-ca")
        server = ca.issue_server("etcd-server", hosts=("127.0.0.1", "localhost"))
        client = ca.issue_client("apiserver-etcd-client", common_name="kube-apiserver-etcd-client")
        (pki / "etcd").mkdir(parents=True, exist_ok=True)
        self.ca = pki / "etcd" / "ca.crt"
        self.server = (pki / "etcd" / "server.crt", pki / "etcd" / "server.key")
        self.client = (pki / "apiserver-etcd-client.crt", pki / "apiserver-etcd-client.key")
        shutil.copy(ca.ca_path, self.ca)
        for source, target in zip((*server, *client), (*self.server, *self.client), strict=True):
            shutil.copy(source, target)

    def tls_args(self) -> list[str]:
        return ["--cacert", str(self.ca), "--cert", str(self.client[0]), "--key", str(self.client[1])]

    def start(self) -> KubeadmEtcd:
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(self.dir.parent / "etcd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [ETCD, "--name", "doc", "--data-dir", str(self.dir), "--listen-client-urls", self.url,
                 "--advertise-client-urls", self.url, "--listen-peer-urls", peer, "--initial-advertise-peer-urls",
                 peer, "--initial-cluster", f"doc={peer}", "--cert-file", str(self.server[0]), "--key-file",
                 str(self.server[1]), "--trusted-ca-file", str(self.ca), "--client-cert-auth", "--unsafe-no-fsync",
                 "--log-level", "warn"], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.ctl("endpoint", "health").returncode == 0:
                return self
            time.sleep(0.2)
        raise RuntimeError("etcd did not become healthy")

    def ctl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([ETCDCTL, "--endpoints", self.url, *self.tls_args(), *args], capture_output=True,
                              check=False, env={**os.environ, "ETCDCTL_API": "3"}, timeout=30)

    def get(self, key: str) -> bytes:
        result = self.ctl("get", key, "-w", "json")
        kvs = json.loads(result.stdout).get("kvs") or []
        if not kvs:
            raise KeyError(key)
        return base64.b64decode(kvs[0]["value"])


class DocAPIServer(KubeAPIServer):
    """The harness's kube-apiserver on the kubeadm-style etcd, plus the flags a page gives it."""

    page_flags: list[str]

    def flags(self) -> list[str]:
        etcd = self.etcd
        assert isinstance(etcd, KubeadmEtcd)
        return [*super().flags(), f"--etcd-cafile={etcd.ca}", f"--etcd-certfile={etcd.client[0]}",
                f"--etcd-keyfile={etcd.client[1]}", *self.page_flags]


# ------------------------------------------------------------------------------------------------ the session

# Names of users and groups: from the temporary root's /etc/passwd and /etc/group (made by
# systemd-sysusers --root), else the host's.
IDS = r"""
id_of() {  # id_of passwd|group NAME-OR-NUMBER
  case "$2" in ''|*[!0-9]*) ;; *) echo "$2"; return ;; esac
  local id
  id=$(awk -F: -v n="$2" '$1 == n { print $3 }' "$root/etc/$1" 2>/dev/null)
  [ -n "$id" ] || id=$(getent "$1" "$2" | cut -d: -f3)
  [ -n "$id" ] || { echo "no $1 entry named $2" >&2; return 1; }
  echo "$id"
}
primary_gid() { awk -F: -v n="$1" '$1 == n { print $4 }' "$root/etc/passwd"; }
"""

SYSTEMCTL = r"""#!/usr/bin/env bash
# systemd stand-in for the doc test: units from $root/etc/systemd/system, ExecStart (host paths mapped
# into $root) run in the background as the unit's User/Group with its UMask and RuntimeDirectory,
# output to $root/journal/<unit>.log, the main pid in $root/journal/<unit>.pid.
set -euo pipefail
root=__ROOT__
__IDS__
unit() { echo "$root/etc/systemd/system/${1%.service}.service"; }
key() { sed -n "s/^$2=//p" "$(unit "$1")" | tail -n 1; }
map() { sed -E "__MAP__"; }
start() {
  local name=${1%.service} command user group as=() runtime
  command=$(key "$1" ExecStart | map)
  user=$(key "$1" User)
  group=$(key "$1" Group)
  if [ -n "$user" ]; then
    as=(setpriv "--reuid=$(id_of passwd "$user")" "--regid=$(id_of group "${group:-$user}")" --clear-groups)
  fi
  runtime=$(key "$1" RuntimeDirectory)
  if [ -n "$runtime" ]; then
    install -d -m "$(key "$1" RuntimeDirectoryMode || true)" -o "$(id_of passwd "${user:-root}")" \
      -g "$(id_of group "${group:-${user:-root}}")" "$root/var/run/$runtime"
    export RUNTIME_DIRECTORY="$root/var/run/$runtime"
  fi
  mkdir -p "$root/journal"
  (umask "$(key "$1" UMask)"; setsid "${as[@]}" $command </dev/null >>"$root/journal/$name.log" 2>&1 &
   echo $! > "$root/journal/$name.pid")
  for _ in $(seq 200); do
    grep -q 'serving KMS' "$root/journal/$name.log" 2>/dev/null && return 0
    kill -0 "$(cat "$root/journal/$name.pid")" 2>/dev/null || { cat "$root/journal/$name.log" >&2; return 1; }
    sleep 0.1
  done
  echo "systemctl stand-in: $name did not start" >&2; return 1
}
case "$1" in
  daemon-reload) ;;
  enable) if [ "${2:-}" = --now ]; then start "$3"; fi ;;
  start|restart) start "$2" ;;
  reload) MAINPID=$(cat "$root/journal/${2%.service}.pid"); eval "$(key "$2" ExecReload)" ;;
  stop) kill -TERM "$(cat "$root/journal/${2%.service}.pid")" ;;
  *) echo "systemctl stand-in: $1 not supported" >&2; exit 1 ;;
esac
"""


ROOTED = r"""#!/usr/bin/env bash
# __TOOL__ with --root (users, groups and paths of the temporary root); a file named on the command line
# is read as given (the page's path, already mapped into the root)
exec /usr/bin/__TOOL__ --root=__ROOT__ "$@"
"""

RUNUSER = r"""#!/usr/bin/env bash
# runuser stand-in: runuser -u USER -- COMMAND..., with USER from the root's /etc/passwd
set -euo pipefail
root=__ROOT__
__IDS__
[ "${1:-}" = -u ] || { echo "runuser stand-in: only runuser -u USER -- COMMAND" >&2; exit 1; }
user=$2; shift 2
[ "${1:-}" = -- ] && shift
exec setpriv --reuid="$(id_of passwd "$user")" --regid="$(primary_gid "$user")" --clear-groups -- "$@"
"""

CHOWN = r"""#!/usr/bin/env bash
# chown stand-in: the owner's user and group names from the root's /etc/passwd and /etc/group
set -euo pipefail
root=__ROOT__
__IDS__
args=() owner=
for arg in "$@"; do
  if [ -z "$owner" ] && [ "${arg#-}" = "$arg" ]; then
    owner=$arg user=${arg%%:*} group=
    case "$arg" in *:*) group=${arg#*:} ;; esac
    arg=${user:+$(id_of passwd "$user")}${group:+:$(id_of group "$group")}
  fi
  args+=("$arg")
done
exec /bin/chown "${args[@]}"
"""


class Session:
    """One user's terminal sessions on one host, under a temporary root."""

    def __init__(self, root: Path, apiserver_binary: str, cwd: str) -> None:
        self.root = root
        for directory in ("etc/systemd/system", "etc/sysusers.d", "etc/tmpfiles.d", "etc/kubernetes/pki",
                          "etc/kubernetes/manifests", "var/lib",
                          "var/run", "var/log", "usr/local/bin", "root", "opt", "src", "journal", "shims",
                          "doc-test"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        (root / "usr/local/bin/kleidi").symlink_to(VENV_BIN / "kleidi")
        shims = root / "shims"
        quoted_root = shlex.quote(str(root))
        # sed -E script mapping the pages' host paths in a unit's command line into the root
        mapping = ";".join(f"s#(^|[ =]){re.escape(d)}([/ ]|$)#\\1{root}{d}\\2#g" for d in MAPPED_DIRS)
        (shims / "systemctl").write_text(SYSTEMCTL.replace("__ROOT__", quoted_root).replace("__IDS__", IDS)
                                         .replace("__MAP__", mapping))
        for tool in ("systemd-sysusers", "systemd-tmpfiles"):  # the real ones, inside the root
            (shims / tool).write_text(ROOTED.replace("__ROOT__", quoted_root).replace("__TOOL__", tool))
        (shims / "runuser").write_text(RUNUSER.replace("__ROOT__", quoted_root).replace("__IDS__", IDS))
        (shims / "chown").write_text(CHOWN.replace("__ROOT__", quoted_root).replace("__IDS__", IDS))
        (shims / "vault").write_text(f"#!/bin/sh\nexec {shlex.quote(str(VENV_BIN / 'bao'))} \"$@\"\n")
        for shim in shims.iterdir():
            shim.chmod(0o755)
        self.cluster = root / "cluster"
        self.cluster.mkdir()
        self.etcd = KubeadmEtcd(self.cluster, root / "etc/kubernetes/pki")
        self.api = DocAPIServer(self.cluster, "apiserver", self.etcd, apiserver_binary, None)
        self.api.page_flags = []
        shutil.copy(self.cluster / "sa.pub", root / "etc/kubernetes/pki/sa.pub")
        self.vault_port = free_port()
        # literal strings of the pages and what they stand for here (and back, in outputs)
        self.subst = [("<kleidi repository URL>", str(ROOT)), ("/path/to/kleidi-checkout", str(ROOT)),
                      ("/path/to/kleidi/", f"{ROOT}/"),
                      ("127.0.0.1:8200", f"127.0.0.1:{self.vault_port}"), ("https://127.0.0.1:2379", self.etcd.url),
                      ("https://10.0.0.10:6443", self.api.url)]
        self.envfile = root / "doc-test" / "env"
        self.envfile.write_text("")
        self.cwdfile = root / "doc-test" / "cwd"
        self.cwdfile.write_text(self.map(cwd))
        self.env = {"PATH": f"{root / 'usr/local/bin'}:{shims}:{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOME": str(root / "root"), "USER": "root", "LOGNAME": "root", "TERM": "xterm",
                    "LANG": "C.UTF-8", "KUBECONFIG": str(self.api.kubeconfig)}
        self.bg: dict[str, Terminal] = {}
        self.last: tuple[str, str] = ("text", "")  # ("text", output) or ("bg", name) of the last run block
        self.printed: list[str] = []  # every output so far, for key-id-format
        self.count = 0
        self.pages: dict[str, list[Block]] = {}
        self.etcd.start()

    # -- mapping

    def map(self, text: str) -> str:
        for doc, real in self.subst:
            text = text.replace(doc, real)
        return _MAPPED.sub(lambda m: f"{self.root}{m.group(1)}", text)

    def unmap(self, text: str) -> str:
        text = text.replace(str(self.root), "")
        for doc, real in self.subst:
            text = text.replace(real, doc)
        return text

    def path(self, doc_path: str) -> Path:
        return Path(self.map(doc_path))

    @property
    def cwd(self) -> Path:
        return Path(self.cwdfile.read_text().strip())

    # -- commands

    def shell(self, script: str, *, errexit: bool = True) -> Terminal:
        self.count += 1
        block = self.root / "doc-test" / f"block-{self.count}.sh"
        block.write_text(self.map(script) + "\n")
        env, cwd = shlex.quote(str(self.envfile)), shlex.quote(str(self.cwdfile))
        runner = (f"{'set -e' if errexit else ''}\n. {env}\ncd \"$(cat {cwd})\"\n"
                  f"trap 'export -p > {env}; pwd > {cwd}' EXIT\n. {shlex.quote(str(block))}\n")
        return Terminal(["bash", "-c", runner], self.env, self.root)

    def run(self, script: str, *, errexit: bool = True, timeout: float = 180) -> tuple[int, str]:
        terminal = self.shell(script, errexit=errexit)
        try:
            code = terminal.wait(timeout)
            output = self.unmap(terminal.output())
        finally:
            terminal.close()
        self.printed.append(output)
        return code, output

    def stop_bg(self, name: str) -> None:
        terminal = self.bg.pop(name)
        try:
            terminal.interrupt()
            self.printed.append(self.unmap(terminal.output()))
        finally:
            terminal.close()

    def close(self) -> None:
        for name in list(self.bg):
            with contextlib.suppress(Exception):
                self.stop_bg(name)
        for pidfile in (self.root / "journal").glob("*.pid"):  # what the systemctl stand-in started
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
        self.api.stop()
        self.etcd.stop()

    # -- what a block shows

    def output_of(self, block: Block) -> Callable[[], str]:
        source = block.options.get("source")
        if "file" in block.options:
            path = self.path(block.options["file"])
            return lambda: self.unmap(path.read_text())
        if "scenario" in block.options:
            _code, output = self.run(textwrap.dedent(SCENARIOS[block.options["scenario"]]), errexit=False)
            return lambda: output
        if source and source.startswith("journal:"):
            log = self.root / "journal" / f"{source.split(':', 1)[1]}.log"
            return lambda: self.unmap(log.read_text()) if log.exists() else ""
        if source and source.startswith("bg:"):
            terminal = self.bg[source.split(":", 1)[1]]
            return lambda: self.unmap(terminal.output())
        kind, value = self.last
        if kind == "bg":
            terminal = self.bg[value]
            return lambda: self.unmap(terminal.output())
        return lambda: value

    # -- the blocks

    def do(self, block: Block) -> None:
        handler = getattr(self, "do_" + block.kind.replace("-", "_"))
        handler(block)

    def do_skip(self, block: Block) -> None:
        assert (block.page, block.first_line) in UNRUNNABLE

    def do_run(self, block: Block) -> None:
        options = block.options
        for name in filter(None, options.get("stop", "").split(",")):
            self.stop_bg(name)
        if "before" in options:
            HOOKS[options["before"]](self)
        if "bg" in options:
            terminal = self.shell(block.text)
            self.bg[options["bg"]] = terminal
            self.last = ("bg", options["bg"])
            ready = re.compile(options.get("ready", "."))
            deadline = time.monotonic() + 60
            while not ready.search(terminal.output()):
                assert terminal.proc.poll() is None, f"{block.where}: exited with {terminal.proc.returncode}:\n" \
                                                     f"{self.unmap(terminal.output())}"
                assert time.monotonic() < deadline, f"{block.where}: not ready:\n{self.unmap(terminal.output())}"
                time.sleep(0.1)
            return
        expected = int(options.get("exit", "0"))
        deadline = time.monotonic() + float(options.get("retry", "0"))
        while True:
            code, output = self.run(block.text)
            if code == expected or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert code == expected, f"{block.where}: exit code {code}, the page expects {expected}; it printed:\n{output}"
        if "quiet" in options:
            assert not output.strip(), f"{block.where}: the page says this prints nothing; it printed:\n{output}"
        self.last = ("text", output)

    def do_output(self, block: Block) -> None:
        read = self.output_of(block)
        deadline = time.monotonic() + 30
        while True:
            printed = read()
            missing = mismatch(block.text, printed, block.options.get("lines"))
            if missing is None:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{block.where}: the page shows\n  {missing}\nbut the run printed:\n{printed}")
            time.sleep(0.2)
        self.printed.append(printed)

    def do_file(self, block: Block) -> None:
        path = self.path(block.options["path"])
        assert path.parent.is_dir(), f"{block.where}: {block.options['path']}'s directory does not exist yet"
        path.write_text(self.map(block.text) + "\n")

    def _merged(self, block: Block) -> dict[str, Any]:
        fragment = yaml.safe_load(self.map(textwrap.dedent(block.text)))
        section = block.options.get("at")
        if section is None:
            return dict(fragment)
        current = self.path("/etc/kleidi/config.yaml")
        config = copy.deepcopy(yaml.safe_load(current.read_text())) if current.exists() else {}
        config.setdefault(section, {}).update(fragment)
        return dict(config)

    def do_edit(self, block: Block) -> None:
        path = self.path(block.options["path"])
        assert path.exists(), block.where
        path.write_text(yaml.safe_dump(self._merged(block), sort_keys=False))

    def do_config(self, block: Block) -> None:
        self.count += 1
        path = self.root / "doc-test" / f"check-{self.count}.yaml"
        path.write_text(yaml.safe_dump(self._merged(block), sort_keys=False))
        env = {**self.env, "PATH": self.env["PATH"]}
        result = subprocess.run([str(VENV_BIN / "kleidi"), "config", "check", "--config", str(path)], env=env,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, f"{block.where}: kleidi config check refused it:\n" \
                                       f"{self.unmap(result.stdout + result.stderr)}"

    def do_apiserver_config(self, block: Block) -> None:
        flags = re.findall(r"^\s*-\s+(--[\w-]+(?:=\S+)?)\s*$", self.map(block.text), re.M)
        assert any(flag.startswith("--encryption-provider-config=") for flag in flags), block.where
        self.api.page_flags = flags
        self.api.start()
        shutil.copy(self.api.dir / "certs" / "apiserver.crt", self.root / "etc/kubernetes/pki/ca.crt")

    def do_key_id_format(self, block: Block) -> None:
        pattern = re.escape(block.text.strip()).replace(re.escape("<version>"), "[1-9][0-9]*")
        pattern = pattern.replace(re.escape("<digest>"), "[A-Za-z0-9_-]{32}")
        backend = block.text.split(":")[1]
        seen = {k for text in self.printed for k in KEY_ID.findall(text) if k.split(":")[1] == backend}
        seen = {k.rstrip(":") for k in seen}
        assert seen, f"{block.where}: no {backend} key_id printed so far"
        bad = sorted(k for k in seen if not re.fullmatch(pattern, k))
        assert not bad, f"{block.where}: key_ids printed that do not have this format: {bad}"

    def run_page(self, page: str) -> None:
        blocks = parse_page(page)
        self.pages[page] = blocks
        for block in blocks:
            self.do(block)


# ------------------------------------------------------------------------------------------------ hooks, scenarios


def _current_key_id(session: Session) -> str:
    with grpc.insecure_channel(f"unix://{session.path('/var/run/kleidi/kleidi.sock')}") as channel:
        return str(v2_grpc.KeyManagementServiceStub(channel).Status(v2_pb.StatusRequest(), timeout=3).key_id)


def apiserver_uses_current_key(session: Session) -> None:
    """The pages say: wait until every apiserver has seen the new key_id (minutes). Here: ask the apiserver
    to probe the plugin (/readyz/kms-providers does when its last probe is 20 s old) until a new write
    carries kleidi's key_id; the probe Secret is deleted again."""
    want = _current_key_id(session)
    deadline = time.monotonic() + 120
    try:
        while True:
            session.api.get("/readyz/kms-providers")
            session.api.kubectl("delete", "secret", "doc-test-probe", "--ignore-not-found")
            session.api.kubectl("create", "secret", "generic", "doc-test-probe", "--from-literal=k=v")
            if storage.parse_etcd_value(session.etcd.get("/registry/secrets/default/doc-test-probe")).key_id == want:
                return
            assert time.monotonic() < deadline, f"the apiserver never wrote with {want}"
            time.sleep(3)
    finally:
        session.api.kubectl("delete", "secret", "doc-test-probe", "--ignore-not-found")


def clone_gets_the_checkouts_venv(session: Session) -> None:
    """scripts/serve.sh in the fresh clone would install kleidi's dependencies from the package index into
    the clone's .venv: the clone borrows this checkout's instead (setup.sh then has nothing to do)."""
    (session.cwd / ".venv").symlink_to(ROOT / ".venv")


def quickstart_etcd_check(session: Session) -> None:
    """vault.md step 9 says: check as in quickstart 2.8; run that block of the quickstart here."""
    block = next(b for b in parse_page("quickstart.md") if b.first_line.startswith("kubectl create secret generic"))
    code, output = session.run(block.text)
    assert code == 0, f"{block.where} (from vault.md): exit code {code}:\n{output}"


def cluster_ca_is_a_ca(session: Session) -> None:
    """On a kubeadm node /etc/kubernetes/pki/ca.crt is the cluster CA, which signs the kubelets' client
    certificates; the harness's apiserver serves a self-signed certificate that is no CA, and Vault's cert
    auth refuses a non-CA certificate without clientAuth. Put a real CA there (nothing later in the page
    verifies the apiserver with that file)."""
    ca = LocalCA(session.cluster / "kubernetes-ca", "kubernetes", common_name="kubernetes")
    shutil.copy(ca.ca_path, session.root / "etc/kubernetes/pki/ca.crt")


HOOKS: dict[str, Callable[[Session], None]] = {
    "cluster-ca-is-a-ca": cluster_ca_is_a_ca,
    "apiserver-uses-current-key": apiserver_uses_current_key,
    "clone-gets-the-checkouts-venv": clone_gets_the_checkouts_venv,
    "quickstart-etcd-check": quickstart_etcd_check,
}

# Failures the pages describe and show the output of, without a command: how to provoke each one.
SCENARIOS: dict[str, str] = {
    "keyring-refused": """
        k=/var/lib/kleidi/keyring.json
        chmod 644 $k; kleidi keys --keyring $k; chmod 600 $k
        chown 1000 $k; kleidi keys --keyring $k; chown kleidi $k
        mv $k $k.away; kleidi keys --keyring $k; mv $k.away $k
    """,
    "keyring-unsafe-at-runtime": """
        chmod 644 /var/lib/kleidi/keyring.json
        sleep 6  # backend.refresh_interval (5 s)
        kleidi status --endpoint unix:///var/run/kleidi/kleidi.sock
        chmod 600 /var/lib/kleidi/keyring.json
    """,
    "keygen-over-a-keyring": "runuser -u kleidi -- kleidi keygen --keyring /var/lib/kleidi/keyring.json",
    "keyring-with-a-retired-version": """
        install -d -m 0700 /root/example
        kleidi keygen --keyring /root/example/keyring.json >/dev/null
        kleidi rotate --keyring /root/example/keyring.json >/dev/null
        kleidi retire 1 --keyring /root/example/keyring.json --yes >/dev/null
        cat /root/example/keyring.json
    """,
    "cert-auth-without-a-certificate": """
        cat > /etc/kleidi/cert.yaml <<'EOF'
        server: {endpoint: unix:///var/run/kleidi/cert.sock}
        telemetry: {address: null}
        backend: {kind: vault, address: http://127.0.0.1:8200, key: kubernetes, auth: {method: cert, role: kleidi}}
        EOF
        timeout 20 kleidi serve --config /etc/kleidi/cert.yaml
    """,
    "secret-id-file-missing": """
        mv /etc/kleidi/vault/secret_id /etc/kleidi/vault/secret_id.away
        sed -e 's#kleidi.sock#missing.sock#' /etc/kleidi/config.yaml > /etc/kleidi/missing.yaml
        echo 'telemetry: {address: null}' >> /etc/kleidi/missing.yaml
        timeout 20 kleidi serve --config /etc/kleidi/missing.yaml
        mv /etc/kleidi/vault/secret_id.away /etc/kleidi/vault/secret_id
    """,
}


# ------------------------------------------------------------------------------------------------ the tests


@pytest.fixture
def session_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kd-", dir="/tmp"))  # short: socket paths stay under 108 bytes
    path.chmod(0o711)  # kleidi's user (the quickstart's unit) reaches its files inside, and lists nothing
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_quickstart_then_local_backend_as_written(session_root: Path) -> None:
    session = Session(session_root, kube_apiserver_binary(), cwd="/src")
    try:
        session.run_page("quickstart.md")
        session.run_page("backends/local.md")
    finally:
        session.close()


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_vault_backend_as_written(session_root: Path) -> None:
    session = Session(session_root, kube_apiserver_binary(), cwd="/root")
    try:
        session.run_page("backends/vault.md")
    finally:
        session.close()
