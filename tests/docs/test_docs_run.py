"""The quickstart and the backend pages, run as written: every fenced block is run, checked or listed here.

In main today this module checks the directives and the KLEIDI_* variables only. The runner that
executes the pages (the Session, the stand-ins and the two end-to-end tests, at commit 2f5c52a)
follows the CLI and error output of issue #11 and comes back with that work.

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
runs a unit's ExecStart in the background with its UMask, logs to a journal file, ``reload`` runs
ExecReload (it returns once the service logs that it serves, where real systemd would return at once);
``vault`` is the ``bao`` CLI (vault.md says they take the same commands); ``etcdctl`` and ``kubectl``
come from the venv (the test extra), as the quickstart tells trial users; kubectl finds the apiserver
through KUBECONFIG, as on a kubeadm node. etcd runs as kubeadm runs it (client TLS with client
certificates under /etc/kubernetes/pki), kube-apiserver is the e2e harness's (tests/e2e/cluster.py),
OpenBao is the real ``bao server -dev`` the page starts.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PAGES = {name: ROOT / "docs" / name for name in ("quickstart.md", "backends/local.md", "backends/vault.md")}

# Host paths the pages use, each rewritten to <temporary root><path>.
MAPPED_DIRS = ("/etc/kleidi", "/etc/kubernetes", "/etc/systemd/system", "/var/lib/kleidi", "/var/run/kleidi",
               "/var/log/kleidi", "/root", "/usr/local/bin", "/opt/kleidi", "/src")
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
                          "are not bound to their key_id and annotations; prefer aes256-gcm96"):
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


# The names the runner defines (its HOOKS and SCENARIOS, at 2f5c52a): a directive must name one of them.
HOOKS = frozenset({"apiserver-uses-current-key", "clone-gets-the-checkouts-venv", "quickstart-etcd-check"})
SCENARIOS = frozenset({"keyring-refused", "keyring-unsafe-at-runtime", "keygen-over-a-keyring",
                       "keyring-with-a-retired-version", "cert-auth-without-a-certificate", "secret-id-file-missing"})


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
