"""The value types and base models every settings model uses: core sections and backends alike.

Nothing here names a backend: a backend's settings model (in its own module) is built from these,
and imports without the backend's optional dependencies.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from kleidi.durations import format_duration, parse_duration
from kleidi.errors import InvalidValue

_MODE_RE = re.compile(r"(?:0o)?([0-7]{3,4})")
MODE_FIX = 'write it as a quoted octal string such as "0600"'


def parse_mode(value: Any) -> Any:
    # A YAML integer is refused, not read as octal: PyYAML reads 0600 (YAML 1.1 octal) as 384 and
    # 600 as decimal 600 (0o1130), and after parsing nothing tells the two apart.
    if isinstance(value, bool | int | float):
        raise PydanticCustomError(
            "mode_not_a_string", "a file mode must be an octal string: an unquoted number is ambiguous in YAML "
            "(0600 is read as 384, 600 as decimal 600)", {"fix": 'quote it: "0600"'})
    if isinstance(value, str):
        match = _MODE_RE.fullmatch(value.strip())
        if not match:
            raise InvalidValue(f"expected an octal file mode such as \"0600\", got {value!r}", fix=MODE_FIX)
        mode = int(match.group(1), 8)
        if mode > 0o777:
            raise InvalidValue("the mode sets setuid, setgid or sticky bits, which kleidi never needs",
                               fix='use three octal digits such as "0600"')
        return mode
    return value


def safe_socket_mode(mode: int) -> int:
    if mode & 0o111:
        raise InvalidValue(f"mode {mode:04o} has execute bits, which mean nothing on a socket",
                           fix='use "0600", or "0660" with socket_group')
    return mode


# The JSON Schema describes what a config file may hold (numbers or strings with a unit, octal
# strings), not the parsed value: without WithJsonSchema pydantic emits the post-validation type
# and non-standard "gt"/"ge"/"le" keywords.
Duration = Annotated[float, BeforeValidator(parse_duration),  # at most durations.MAX_SECONDS
                     Field(gt=0, json_schema_extra={"x-kleidi-type": "duration"}),
                     # Written out (config check, the schema's defaults) as a file must write it.
                     PlainSerializer(format_duration, return_type=str, when_used="json"),
                     # A Go duration, as kleidi.durations parses it: a bare number is refused there too.
                     WithJsonSchema({"type": "string",
                                     "pattern": r"^\s*\+?((\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h))+\s*$"})]
FileMode = Annotated[int, BeforeValidator(parse_mode),
                     PlainSerializer(lambda v: f"{v:04o}", return_type=str),
                     WithJsonSchema({"type": "string", "pattern": r"^\s*(0o)?[0-7]{3,4}\s*$"})]
# Read and write bits only (each digit one of 0, 2, 4, 6); whether others may have them depends on
# authenticate_callers (ServerSettings._socket_mode_is_safe).
SocketMode = Annotated[FileMode, AfterValidator(safe_socket_mode),
                       WithJsonSchema({"type": "string", "pattern": r"^\s*(0o|0)?[0246]{3}\s*$"})]


def check_url(value: Any) -> Any:
    """No credentials in a URL: the URL is shown in logs, Status, /readyz, doctor and errors."""
    if not isinstance(value, str):
        return value  # pydantic's own str check reports it (without echoing it: hide_input_in_errors)
    scheme, sep, rest = value.strip().partition("://")
    authority = re.split(r"[/?#]", rest if sep else value.strip(), maxsplit=1)[0]
    if "@" in authority:
        shown = f"{scheme}://***@{authority.rpartition('@')[2]}" if sep else f"***@{authority.rpartition('@')[2]}"
        raise PydanticCustomError(
            "url_credentials", "the URL holds a user name or password ({shown}), which would be shown in logs, "
            "Status and errors", {"shown": shown, "fix": "remove it from the URL and give the credential in the "
                                  "auth settings (backend.auth: a token_file, or an AppRole secret_id_file)"})
    if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", value.strip()):
        raise PydanticCustomError(
            "url_invalid", "expected an http:// or https:// URL without ?query or #fragment",
            {"fix": "write the server's URL such as https://vault.example.com:8200"})
    return value.strip().rstrip("/")


Url = Annotated[str, BeforeValidator(check_url),
                WithJsonSchema({"type": "string", "format": "uri", "pattern": r"^https?://[^/@\s?#]+(/[^\s?#]*)?$"})]
"""A server URL, http(s)://host[:port][/path]; refused if it holds credentials (user:password@)."""

def check_env_name(value: Any) -> Any:
    # A secret pasted here by mistake would otherwise be echoed in "environment variable <it> is not set".
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise PydanticCustomError("env_name_invalid", "expected the name of an environment variable (letters, "
                                  "digits, _), not its value",
                                  {"fix": "put the credential in that variable or in a file and give its name here "
                                   "(or use the *_file setting)"})
    return value


# Optional inside the Annotated, so that the field's annotation stays `str | None` (for the docs).
OptionalEnvName = Annotated[str | None, BeforeValidator(check_env_name),
                            WithJsonSchema({"anyOf": [{"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                                                      {"type": "null"}]})]
"""The name of an environment variable that holds a credential (never the credential itself), or null."""

NO_INPUT_ERRORS = frozenset({"url_credentials", "url_invalid", "mode_not_a_string", "env_name_invalid"})
"""Error types whose input is never printed: it may hold a credential, or it misleads (384 for 0600)."""


class Settings(BaseModel):
    # hide_input_in_errors: str(ValidationError) never shows a value, whatever prints it;
    # format_validation_error decides what to show.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, hide_input_in_errors=True)


class BackendSettingsBase(Settings):
    """What every backend's settings have: its kind and how often and how long its keys are used.

    A backend's own settings model subclasses this one, with ``kind: Literal["<name>"]``; the
    registry puts every installed backend's model into the config's ``backend`` union."""

    kind: str
    """Backend type."""

    refresh_interval: Duration = 5.0
    """How often the backend's key versions are re-read in the background. Status is answered from
    this state, never with a backend call; a rotation shows in Status within this interval."""

    probe_interval: Duration = 30.0
    """How often a wrap/unwrap round trip checks that the KEK works; Status healthz reflects it."""

    timeout: Duration = 2.0
    """Longest wait for one backend call. Keep it under the apiserver's KMS timeout (3s by default)
    so that a slow backend gives a clear UNAVAILABLE instead of a deadline error."""
