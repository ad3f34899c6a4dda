"""``kleidi scan``: which objects in etcd are stored how, and on which key_id (docs/rotation.md).

Reads etcd directly and read-only (:class:`kleidi.etcd.EtcdReader`), one pinned revision, page by page,
and counts every value per resource, storage class (:func:`kleidi.etcd.classify`), provider and key_id.
Optionally compares the key_ids with what a kleidi reports: its Status (``--endpoint``: the current
key_id) or its own backend (``--config``: every version, which are old and which retired). Nothing of
a value's content, and no object name, is ever returned.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kleidi.errors import ConfigError, KleidiError
from kleidi.etcd import EtcdReader, KeyState, classify, kleidi_key_version, resource_of
from kleidi.etcd.classify import CLASSES, KMS_V2, PLAINTEXT
from kleidi.etcd.reader import DEFAULT_PAGE_SIZE


@dataclass(frozen=True)
class Reference:
    """The key_ids a kleidi knows, to tell current from old, retired and unknown ones."""

    source: str
    current: str | None
    usable: frozenset[str] = frozenset()
    retired: frozenset[str] = frozenset()
    versions_known: bool = False
    """True when every version is known (``--config``); Status alone gives only the current key_id."""

    def state(self, key_id: str) -> KeyState:
        if key_id == self.current:
            return KeyState.CURRENT
        if key_id in self.retired:
            return KeyState.RETIRED
        if key_id in self.usable:
            return KeyState.OLD
        return KeyState.UNKNOWN if self.versions_known else KeyState.UNCHECKED

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "current_key_id": self.current, "usable_key_ids": sorted(self.usable),
                "retired_key_ids": sorted(self.retired), "all_versions_known": self.versions_known}


def reference_from_endpoint(endpoint: str, timeout: float = 3.0) -> Reference:
    """The current key_id from a running kleidi's Status (as the apiserver asks it)."""
    from kleidi.client import check_status

    result = check_status(endpoint, timeout)
    if result.error is not None or not result.key_id:
        raise ConfigError(f"kleidi at {endpoint} gave no key_id: {result.error or 'empty key_id'}",
                          fix=result.fix or "check --endpoint with `kleidi status --endpoint ...`")
    return Reference(source=f"Status of {endpoint}", current=result.key_id, usable=frozenset({result.key_id}))


def reference_from_config(config_file: Path | None, backend_overrides: dict[str, Any] | None = None) -> Reference:
    """Every key version from kleidi's own backend, read with the config kleidi serves with."""
    from kleidi.config import load_settings
    from kleidi.registry import create_backend

    settings = load_settings(config_file, backend_overrides or {})

    async def load() -> Any:
        backend = create_backend(settings.backend)
        try:
            async with asyncio.timeout(settings.backend.timeout + 5):
                return await backend.load_keys()
        finally:
            await backend.close()

    try:
        keys = asyncio.run(load())
    except TimeoutError:
        raise ConfigError(f"the {settings.backend.kind} backend did not answer in time",
                          fix="check it with `kleidi doctor`") from None
    except ConfigError:
        raise
    except KleidiError as exc:  # e.g. BackendUnavailable: scan could not look, which is exit 2, not 1
        raise ConfigError(f"cannot read the key versions of the {settings.backend.kind} backend: {exc.message}",
                          fix=exc.fix or "check it with `kleidi doctor`") from None
    return Reference(source=f"{settings.backend.kind} backend of {config_file or 'the default config'}",
                     current=keys.current.key_id, usable=frozenset(keys.usable), retired=frozenset(keys.retired),
                     versions_known=True)


@dataclass(frozen=True)
class Condition:
    """One ``--fail-if``: ``plaintext`` or ``key-id=<key_id>``."""

    kind: str
    key_id: str | None = None

    @classmethod
    def parse(cls, text: str) -> Condition:
        text = text.strip()
        if text == "plaintext":
            return cls("plaintext")
        if text.startswith("key-id=") and len(text) > len("key-id="):
            return cls("key-id", text[len("key-id="):])
        raise ConfigError(f"--fail-if {text!r} is not a condition",
                          fix="use --fail-if plaintext or --fail-if key-id=<key_id> (repeatable)")

    def __str__(self) -> str:
        return self.kind if self.key_id is None else f"key-id={self.key_id}"


@dataclass(frozen=True)
class Row:
    """Objects of one resource stored one way."""

    resource: str
    group: str
    cls: str
    provider: str | None
    key_id: str | None
    encoding: str | None
    count: int
    kleidi_version: int | None = None
    key_state: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"resource": self.resource, "group": self.group, "class": self.cls, "provider": self.provider,
                "key_id": self.key_id, "kleidi_version": self.kleidi_version, "key_state": self.key_state,
                "encoding": self.encoding, "count": self.count}


@dataclass
class ScanResult:
    endpoint: str
    prefix: str
    revision: int
    objects: int
    seconds: float
    rows: list[Row]
    reference: Reference | None
    conditions: list[tuple[Condition, int]] = field(default_factory=list)
    """Each ``--fail-if`` with how many objects meet it."""

    @property
    def failed(self) -> bool:
        return any(count for _, count in self.conditions)

    def totals(self) -> dict[str, int]:
        totals = dict.fromkeys(CLASSES, 0)
        for row in self.rows:
            totals[row.cls] += row.count
        return totals

    def key_ids(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for row in self.rows:
            if row.key_id is not None:
                counts[row.key_id] += row.count
        return dict(sorted(counts.items()))

    def as_dict(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "prefix": self.prefix, "revision": self.revision, "objects": self.objects,
                "seconds": round(self.seconds, 3), "totals": self.totals(), "key_ids": self.key_ids(),
                "reference": self.reference.as_dict() if self.reference else None,
                "rows": [row.as_dict() for row in self.rows],
                "fail_if": [{"condition": str(c), "objects": n, "met": n > 0} for c, n in self.conditions],
                "failed": self.failed}


def _normal_prefix(prefix: str) -> bytes:
    prefix = "/" + prefix.strip().strip("/")
    if prefix == "/":
        raise ConfigError("--prefix may not be empty", fix="use kube-apiserver's --etcd-prefix, default /registry")
    return prefix.encode() + b"/"


def _ranges(root: bytes, resources: Iterable[str]) -> list[bytes]:
    """Key prefixes that hold the selected resources: ``name`` under ``<root>name/``; ``name.group`` under
    ``<root>group/name/`` (CRDs) and ``<root>name/`` (built-ins of named groups)."""
    ranges: set[bytes] = set()
    for spec in resources:
        name, _, group = spec.partition(".")
        if not name or "/" in spec:
            raise ConfigError(f"--resources {spec!r} is not a resource", fix="use plural names: secrets,configmaps,"
                              "widgets.example.com")
        ranges.add(root + name.encode() + b"/")
        if group:
            ranges.add(root + group.encode() + b"/" + name.encode() + b"/")
    return sorted(ranges)


def _selected(resources: frozenset[str]) -> Callable[[str, str], bool]:
    def match(resource: str, group: str) -> bool:
        return not resources or resource in resources or f"{resource}.{group}" in resources
    return match


def scan(reader: EtcdReader, prefix: str = "/registry", resources: Iterable[str] = (),
         page_size: int = DEFAULT_PAGE_SIZE, reference: Reference | None = None,
         conditions: Iterable[Condition] = (), progress: Callable[[int, int], None] | None = None) -> ScanResult:
    """Count every stored object under ``prefix`` (or only ``resources``) at one revision.

    ``progress(done, total)`` is called after each page."""
    started = time.monotonic()
    root = _normal_prefix(prefix)
    wanted = frozenset(r.strip() for r in resources if r.strip())
    revision, total = reader.snapshot(root)
    ranges = _ranges(root, wanted) if wanted else [root]
    if wanted:
        total = sum(reader.count(r, revision) for r in ranges)
    match = _selected(wanted)
    counts: Counter[tuple[str, str, str, str | None, str | None, str | None]] = Counter()
    done = 0
    for key_range in ranges:
        for page in reader.pages(key_range, revision, page_size):
            for key, value in page:
                resource, group = resource_of(key, root)
                if not match(resource, group):
                    continue
                s = classify(value)
                counts[(resource, group, s.cls, s.provider, s.key_id, s.encoding)] += 1
            done += len(page)
            if progress is not None:
                progress(done, total)
    rows = [Row(resource, group, cls, provider, key_id, encoding, n,
                kleidi_key_version(key_id) if key_id else None,
                (reference.state(key_id) if reference else KeyState.UNCHECKED).value if key_id else None)
            for (resource, group, cls, provider, key_id, encoding), n in sorted(counts.items(), key=_sort_key)]
    checked = [(c, sum(r.count for r in rows if _meets(c, r))) for c in conditions]
    return ScanResult(endpoint=reader.endpoint, prefix=root.decode().rstrip("/"), revision=revision,
                      objects=sum(counts.values()), seconds=time.monotonic() - started, rows=rows,
                      reference=reference, conditions=checked)


def _sort_key(item: tuple[tuple[str, str, str, str | None, str | None, str | None], int]) -> tuple[str, ...]:
    (resource, group, cls, provider, key_id, encoding), _ = item
    return (group, resource, str(CLASSES.index(cls)), provider or "", key_id or "", encoding or "")


def _meets(condition: Condition, row: Row) -> bool:
    if condition.kind == "plaintext":
        return row.cls == PLAINTEXT
    return row.cls == KMS_V2 and row.key_id == condition.key_id


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr while scanning (only when ``enabled``: stderr is a terminal)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("scanning etcd"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("scan", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def table_rows(result: ScanResult) -> list[tuple[Any, ...]]:
    """The rows of the human table: resource, class, provider, key_id, kleidi version, key state, objects."""
    return [(f"{r.resource}.{r.group}" if r.group else r.resource,
             f"{r.cls} ({r.encoding})" if r.encoding else r.cls, r.provider, r.key_id,
             f"v{r.kleidi_version}" if r.kleidi_version is not None else None, r.key_state, r.count)
            for r in result.rows]


def summary(result: ScanResult) -> list[str]:
    """The lines under the table: totals, the reference compared with, each --fail-if."""
    totals = ", ".join(f"{cls} {n}" for cls, n in result.totals().items() if n)
    lines = [f"{result.objects} objects under {result.prefix}/ at etcd revision {result.revision} "
             f"({result.endpoint}, {result.seconds:.1f} s): {totals or 'none'}"]
    if result.reference is not None:
        lines.append(f"key_ids compared with {result.reference.source}: current {result.reference.current}")
    for condition, count in result.conditions:
        lines.append(f"--fail-if {condition}: {'MET by ' + str(count) + ' objects' if count else 'not met'}")
    return lines


__all__ = ["Condition", "Reference", "Row", "ScanResult", "progress_bar", "reference_from_config",
           "reference_from_endpoint", "scan", "summary", "table_rows"]
