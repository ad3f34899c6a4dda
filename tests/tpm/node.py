"""One control-plane node of the TPM backend's tests: a swtpm, a config file and its key store, driven
through the real `kleidi tpm` commands (in-process, through click) as an operator would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from kleidi.backends.tpm import TpmBackend, TpmBackendSettings
from kleidi.backends.tpm.cli import tpm
from tests.tpm.swtpm import Swtpm


class Node:
    def __init__(self, directory: Path, swtpm: Swtpm, **settings: Any) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self.swtpm = swtpm
        self.backend_config: dict[str, Any] = {"kind": "tpm", "tcti": swtpm.tcti, "timeout": "10s",
                                               "key_store": str(directory / "tpm-keystore.json"), **settings}
        self.config_file = directory / "kleidi.yaml"
        self.config_file.write_text(yaml.safe_dump({"backend": self.backend_config}))

    @property
    def settings(self) -> TpmBackendSettings:
        return TpmBackendSettings.model_validate(self.backend_config)

    @property
    def key_store(self) -> Path:
        return Path(self.backend_config["key_store"])

    def backend(self) -> TpmBackend:
        return TpmBackend(self.settings)

    def kleidi_tpm(self, *args: str, check: bool = True, input: str | None = None) -> Any:
        """`kleidi tpm ARGS --config <this node's config>`; returns the click result."""
        result = CliRunner().invoke(tpm, [*args, "--config", str(self.config_file)], input=input)
        if check and result.exit_code != 0:
            raise AssertionError(f"kleidi tpm {' '.join(args)} failed: {result.output}") from result.exception
        return result

    def init(self) -> Node:
        self.kleidi_tpm("init")
        return self

    def enrol_from(self, source: Node) -> None:
        """This node enrolled by ``source``: enrol-request here, enrol there, import here."""
        request = self.directory / "enrol-request.json"
        request.write_text(self.kleidi_tpm("enrol-request").output)
        enrolment = self.directory / "enrolment.json"
        enrolment.write_text(source.kleidi_tpm("enrol", str(request)).output)
        self.kleidi_tpm("import", str(enrolment))
