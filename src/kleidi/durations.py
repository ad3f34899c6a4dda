"""The one parser of durations: every CLI flag that takes one and every config setting use it.

The syntax is Go's ``time.ParseDuration`` (``3s``, ``500ms``, ``1m30s``, ``2h45m``), because what
``kleidi encryption-config`` writes is read by kube-apiserver with exactly that parser, and one
syntax everywhere is one thing to learn. A bare number is refused, never read as seconds: the
apiserver refuses it too (``time: missing unit in duration "3"``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from kleidi.errors import InvalidValue

MAX_SECONDS = 30 * 24 * 3600.0
"""No interval or timeout of kleidi's needs more than 30 days; a larger one (or inf) is a typo."""

UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# Longest units first, so that "ms" is not read as "m" followed by a stray "s".
_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_WHOLE = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")

EXAMPLES = "e.g. 500ms, 3s, 1m30s or 2h"
BARE_NUMBER_FIX = "write it with a unit, e.g. 3s"


class DurationError(InvalidValue):
    """A value that is not a duration; ``fix`` says how to write it. A ValueError too, so that a
    settings validator that raises it reports the setting's error with this fix."""


def parse_duration(value: Any, maximum: float = MAX_SECONDS) -> float:
    """Seconds in ``value``, a Go duration string; anything else raises :class:`DurationError`.

    Zero and negative durations parse (as in Go): whether one is allowed is the caller's rule."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DurationError(f"expected a duration ({EXAMPLES})", "write it as a string with a unit, e.g. 3s")
    if isinstance(value, int | float):
        shown = repr(value) if len(repr(value)) <= 20 else f"a {len(repr(value))}-digit number"
        too_long = "" if abs(value) <= maximum else f", and durations are at most {_longest(maximum)}"
        raise DurationError(f"a bare number ({shown}) is not a duration: the unit is missing{too_long}",
                            BARE_NUMBER_FIX)
    text = value.strip()
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", text):
        raise DurationError(f"{text!r} is not a duration: the unit is missing", BARE_NUMBER_FIX)
    if not _WHOLE.fullmatch(text):
        shown = text if len(text) <= 40 else f"{text[:30]}... ({len(text)} characters)"
        raise DurationError(f"{shown!r} is not a duration", f"write a number and a unit ({', '.join(UNITS)}), "
                            f"{EXAMPLES}")
    sign = -1.0 if text.startswith("-") else 1.0
    seconds = sign * sum(float(number) * UNITS[unit] for number, unit in _PART.findall(text))
    if not math.isfinite(seconds) or abs(seconds) > maximum:
        raise DurationError(f"{text[:40]!r} is too long: durations are at most {_longest(maximum)}",
                            f"use at most {format_duration(maximum)}")
    return seconds


def _longest(maximum: float) -> str:
    days = maximum / 86400
    return f"{days:g} days ({format_duration(maximum)})" if days >= 1 and days == int(days) else \
        format_duration(maximum)


def format_duration(seconds: float) -> str:
    """The shortest Go duration for whole seconds or milliseconds (30 days -> 720h)."""
    if seconds >= 1 and seconds == int(seconds):
        whole, text = int(seconds), ""
        for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
            if whole >= size:
                text += f"{whole // size}{unit}"
                whole %= size
        return text
    return f"{round(seconds * 1000, 3):g}ms"
