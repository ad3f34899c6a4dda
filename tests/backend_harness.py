"""How the plugin-level suites (tests/conformance, tests/e2e) run on every backend without naming one.

Each backend's test module (``tests/**/test_backend_<kind>.py``) defines a function
``backend_under_test(request, workdir) -> BackendUnderTest``: fresh key material in that backend, the
config's ``backend`` section that uses it, and how an operator rotates and retires its versions. The
suites are parametrized over every module that defines one, so a new backend joins them from its own
test module alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).parent
HOOK = "backend_under_test"


@dataclass
class BackendUnderTest:
    config: dict[str, Any]
    """The config file's ``backend`` section (``kind`` and the backend's settings)."""
    rotate: Callable[[], None]
    """Make a new KEK version current, as the backend's operator would."""
    retire: Callable[[str], None]
    """Make the version behind a key_id unable to decrypt, as the backend's operator would."""


Harness = Callable[[pytest.FixtureRequest, Path], BackendUnderTest]


def harnesses() -> dict[str, Harness]:
    """Backend kind -> its test module's ``backend_under_test``, for every backend test module."""
    found: dict[str, Harness] = {}
    for path in sorted(TESTS.rglob("test_backend_*.py")):
        module = importlib.import_module(".".join(("tests", *path.relative_to(TESTS).with_suffix("").parts)))
        hook = getattr(module, HOOK, None)
        if hook is not None:
            found[path.stem.removeprefix("test_backend_")] = hook
    return found


def backend_params() -> list[Any]:
    """pytest params, one per backend, with the backend's kind as the test id."""
    return [pytest.param(hook, id=kind) for kind, hook in harnesses().items()]
