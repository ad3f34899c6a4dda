"""A backend whose optional dependencies are missing (issue 11, item 1).

The real ``kleidi`` console script runs with a ``sitecustomize`` on PYTHONPATH that puts a finder
first on ``sys.meta_path`` refusing ``aiohttp`` (the ``vault`` extra), exactly as a ``pip install``
of the checkout without ``[vault]`` leaves it: the import fails with ``ModuleNotFoundError`` named
``aiohttp``. (A second venv would prove the same at the cost of an install per run.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kleidi
from kleidi import registry
from tests.conftest import run_kleidi

WORDING = (f"fix: pip install 'kleidi[vault]' (from a checkout: pip install '/path/to/kleidi[vault]'; from a wheel: "
           f"pip install 'kleidi-{kleidi.__version__}-py3-none-any.whl[vault]')")
PROBLEM = "the vault backend needs the optional dependencies of kleidi[vault] (aiohttp is not installed)"

BLOCKER = '''
import sys


class _NoAiohttp:
    """Refuses aiohttp as if the vault extra had never been installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "aiohttp" or name.startswith("aiohttp."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoAiohttp())
'''


@pytest.fixture
def without_aiohttp(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": str(site), "VAULT_TOKEN_FOR_TEST": "unused"}


@pytest.fixture
def vault_config(tmp_path: Path) -> Path:
    path = tmp_path / "vault.yaml"
    path.write_text(f"server:\n  endpoint: unix://{tmp_path}/k.sock\ntelemetry:\n  address: null\n"
                    "backend:\n  kind: vault\n  address: http://127.0.0.1:1\n  key: kleidi\n"
                    "  auth: {method: token, token_env: VAULT_TOKEN_FOR_TEST}\n")
    return path


def _refused_with_the_wording(result: object) -> None:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert result.returncode == 2, stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr and "ModuleNotFoundError" not in stderr, stderr
    assert f"kleidi: error: {PROBLEM}\n  {WORDING}\n" in stderr, stderr


def test_the_blocker_really_hides_aiohttp(without_aiohttp: dict[str, str], tmp_path: Path) -> None:
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", "import aiohttp"], env=without_aiohttp, capture_output=True,
                           text=True, check=False)
    assert probe.returncode == 1 and "No module named 'aiohttp'" in probe.stderr


def test_policy_vault_needs_no_extra(without_aiohttp: dict[str, str], vault_config: Path) -> None:
    """The backend module imports without its extra (only talking to Vault needs aiohttp): the policy
    is printed the same with and without it."""
    without = run_kleidi("policy", "vault", "--config", str(vault_config), env=without_aiohttp)
    assert without.returncode == 0 and "Traceback" not in without.stderr, without.stderr
    assert without.stdout == run_kleidi("policy", "vault", "--config", str(vault_config)).stdout
    assert "/encrypt/" in without.stdout and "capabilities" in without.stdout


def test_config_check_refuses_a_vault_config_that_cannot_run(without_aiohttp: dict[str, str],
                                                             vault_config: Path) -> None:
    _refused_with_the_wording(run_kleidi("config", "check", "--config", str(vault_config), env=without_aiohttp))
    assert run_kleidi("config", "check", "--config", str(vault_config)).returncode == 0


def test_serve_names_the_extra_in_the_same_words(without_aiohttp: dict[str, str], vault_config: Path) -> None:
    _refused_with_the_wording(run_kleidi("serve", "--config", str(vault_config), env=without_aiohttp))


def test_doctor_puts_the_fix_in_the_fix_column(without_aiohttp: dict[str, str], vault_config: Path) -> None:
    result = run_kleidi("doctor", "--config", str(vault_config), "--output", "json", env=without_aiohttp)
    assert result.returncode == 1, result.stderr
    backend = {c["name"]: c for c in json.loads(result.stdout)}["backend"]
    assert backend == {"name": "backend", "result": "FAIL", "detail": PROBLEM, "fix": WORDING.removeprefix("fix: ")}
    # The table shows kleidi[vault] as written: rich would read [vault] as markup and drop it.
    table = run_kleidi("doctor", "--config", str(vault_config), env=without_aiohttp)
    assert table.returncode == 1
    row = next(line for line in table.stdout.splitlines() if "backend" in line)  # piped: one line, uncut
    assert PROBLEM in row and WORDING.removeprefix("fix: ") in row, table.stdout


def test_the_local_backend_needs_no_extra(without_aiohttp: dict[str, str], tmp_path: Path) -> None:
    keyring = tmp_path / "ring.json"
    assert run_kleidi("keygen", "--keyring", str(keyring), env=without_aiohttp).returncode == 0
    check = run_kleidi("config", "check", "--keyring", str(keyring), env=without_aiohttp)
    assert check.returncode == 0, check.stderr


def test_backends_lists_each_backend_and_the_extra_it_lacks(without_aiohttp: dict[str, str]) -> None:
    listed = {row["name"]: row for row in json.loads(
        run_kleidi("backends", "--output", "json", env=without_aiohttp).stdout)}
    assert listed["local"]["usable"] is True and listed["local"]["fix"] is None
    assert listed["vault"] == {"name": "vault", "source": "kleidi.backends.vault:VaultBackend", "usable": False,
                               "problem": PROBLEM, "fix": WORDING.removeprefix("fix: ")}
    table = run_kleidi("backends", env=without_aiohttp)
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if "vault" in line)
    assert "no" in row and WORDING.removeprefix("fix: ") in row  # kleidi[vault] survives rich
    with_extra = {row["name"]: row["usable"] for row in json.loads(run_kleidi("backends", "-o", "json").stdout)}
    assert with_extra == {name: True for name in registry.available()}  # the test extra installs every one


def test_schema_and_docs_include_a_backend_whose_extra_is_missing(without_aiohttp: dict[str, str]) -> None:
    """Settings models import without their extras: a machine with some extras only still gets the
    whole schema and reference."""
    schema = run_kleidi("config", "schema", env=without_aiohttp)
    assert schema.returncode == 0 and "VaultBackendSettings" in schema.stdout, schema.stderr
    assert schema.stdout == run_kleidi("config", "schema").stdout
    docs = run_kleidi("config", "docs", env=without_aiohttp)
    assert docs.returncode == 0 and "backend.address" in docs.stdout
