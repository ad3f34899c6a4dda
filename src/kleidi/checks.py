"""The result of one ``kleidi doctor`` check, and the checks a backend's own files share.

A backend contributes its own checks (:meth:`kleidi.backends.base.Backend.file_checks`,
:meth:`~kleidi.backends.base.Backend.preflight`); doctor runs them without knowing any backend.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

PASS, FAIL, SKIP = "pass", "FAIL", "skip"


@dataclass
class Check:
    name: str
    result: str
    detail: str
    fix: str = ""


def private_file(label: str, path: Path) -> Check:
    """A credential or key file: it exists and no one but its owner may read it."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        return Check(label, FAIL, f"{path}: {exc.strerror}", "create the file or fix the path")
    if mode & 0o077:
        return Check(label, FAIL, f"{path} has mode {mode:04o}, readable by others", f"chmod 600 {path}")
    return Check(label, PASS, f"{path}: mode {mode:04o}")
