"""``kleidi migrate``: rewrite every selected object through kube-apiserver, so that it is stored with the
current key.

How it works, and why a write of an unchanged object is enough: kube-apiserver's storage layer
(k8s.io/apiserver ``storage/etcd3/store.go``, ``GuaranteedUpdate``) skips the etcd write when the new
serialization equals the stored one *unless the stored value is stale*, and the KMS v2 transformer
(``envelope/kmsv2/envelope.go``, ``TransformFromStorage``) reports a value as stale when its key_id (or
its DEK source type) differs from the one the apiserver encrypts with now. So an update that changes
nothing (``kubectl get | kubectl replace``) rewrites exactly the objects on an old key_id, and only once
that apiserver has taken up the new key_id (it polls the plugin's Status about every minute).

The run lists each resource with paging (``limit`` and ``continue``), and puts every object back
unchanged with its ``resourceVersion`` (an update, ``fieldManager=kleidi-migrate``). A conflict (the
object changed after the list) is re-read and retried a bounded number of times; an object deleted
meanwhile is skipped. Requests are rate-limited (``qps``) and at most ``concurrency`` are in flight.
Progress (the continue token of the page in work, the last object done before which everything is done,
the counts) is kept in a state file (0600) after every batch, so an interrupted run resumes where it
stopped. The run ends with a scan of etcd (:mod:`kleidi.tools.scan`) that proves nothing selected is
left on an old key_id, when etcd access is given.

Nothing here logs or reports an object's content: only resource, namespace, name, counts and the
apiserver's HTTP status and reason.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kleidi import __version__
from kleidi.backends.local import write_atomically
from kleidi.encryption_config import check_resource
from kleidi.errors import ConfigError, ServiceUnavailable

DEFAULT_QPS = 20.0
DEFAULT_CONCURRENCY = 4
DEFAULT_PAGE_SIZE = 250
DEFAULT_RETRIES = 5
DEFAULT_STATE_FILE = Path("kleidi-migrate.state.json")
FIELD_MANAGER = "kleidi-migrate"
STATE_FORMAT = 1
_REQUEST_TIMEOUT = 60.0
_SERVER_ERROR_BACKOFF = 1.0


class ApiUnavailable(ServiceUnavailable):
    """kube-apiserver cannot be reached or refuses kleidi migrate's requests (authentication, RBAC)."""


class ApiLost(ApiUnavailable):
    """kube-apiserver went away during the run; the progress is saved for --resume."""


def missing_extra(module: str) -> ConfigError:
    return ConfigError(
        f"kleidi migrate needs the optional dependencies of kleidi[migrate] ({module} is not installed)",
        fix=f"pip install 'kleidi[migrate]' (from a checkout: pip install '/path/to/kleidi[migrate]'; from a wheel: "
            f"pip install 'kleidi-{__version__}-py3-none-any.whl[migrate]')")


# --------------------------------------------------------------------------------------------- the API


class RateLimiter:
    """At most ``qps`` requests a second across all threads, evenly spaced (no bursts)."""

    def __init__(self, qps: float) -> None:
        self._interval = 1.0 / qps
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self._interval
        if slot > now:
            time.sleep(slot - now)


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any]

    @property
    def reason(self) -> str:
        """The apiserver's Status reason (``Conflict``, ``Forbidden``...), never the object's content."""
        return f"HTTP {self.status} {self.body.get('reason') or ''}".strip()


class KubeApi:
    """kube-apiserver through the Kubernetes Python client's transport (kubeconfig or in-cluster
    credentials, TLS, token refresh), speaking raw JSON so that objects are written back exactly as read."""

    def __init__(self, client: Any, limiter: RateLimiter) -> None:
        self._client = client
        self._limiter = limiter
        self.server: str = client.configuration.host

    @classmethod
    def connect(cls, kubeconfig: Path | None, context: str | None, qps: float, concurrency: int) -> KubeApi:
        """A client from ``kubeconfig`` (else ``$KUBECONFIG``, else ``~/.kube/config``), else the pod's
        in-cluster ServiceAccount."""
        try:
            from kubernetes import client as k8s_client
            from kubernetes import config as k8s_config
        except ImportError:
            raise missing_extra("kubernetes") from None
        configuration = k8s_client.Configuration()
        configuration.connection_pool_maxsize = max(concurrency, 1) + 1
        path = kubeconfig or _default_kubeconfig()
        try:
            if path is not None:
                if not path.is_file():
                    raise ConfigError(f"kubeconfig {path} does not exist or is not a file",
                                      fix="pass --kubeconfig with the file kubectl uses, or set KUBECONFIG")
                k8s_config.load_kube_config(config_file=str(path), context=context,
                                            client_configuration=configuration,
                                            persist_config=False)  # type: ignore[no-untyped-call]
            else:
                if context is not None:
                    raise ConfigError("--context needs a kubeconfig", fix="pass --kubeconfig or set KUBECONFIG")
                k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except k8s_config.ConfigException as exc:
            where = f"kubeconfig {path}" if path is not None else "in-cluster configuration"
            raise ConfigError(f"cannot use the {where}: {_one_line(str(exc))}",
                              fix="pass --kubeconfig (and --context) for a cluster kubectl reaches, or run in a pod "
                                  "with a ServiceAccount") from None
        return cls(k8s_client.ApiClient(configuration), RateLimiter(qps))

    def request(self, method: str, path: str, query: list[tuple[str, Any]] | None = None,
                body: dict[str, Any] | None = None) -> Response:
        """One rate-limited request; the status and the JSON body. Connection failures raise ApiUnavailable."""
        import urllib3

        self._limiter.acquire()
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        try:
            serialized = self._client.param_serialize(method, path, query_params=query or [], header_params=headers,
                                                      body=body, auth_settings=["BearerToken"])
            response = self._client.call_api(*serialized, _request_timeout=_REQUEST_TIMEOUT)
            status, data = int(response.status), response.read()
        except urllib3.exceptions.HTTPError as exc:
            raise ApiUnavailable(f"kube-apiserver at {self.server} cannot be reached: {_one_line(str(exc))[:300]}",
                                 fix="check the kubeconfig's server address and that the apiserver is up") from None
        except OSError as exc:
            raise ApiUnavailable(f"kube-apiserver at {self.server} cannot be reached: {exc.strerror or exc}",
                                 fix="check the kubeconfig's server address and that the apiserver is up") from None
        except Exception as exc:  # the client's ApiException (TLS failures come as status 0)
            if type(exc).__name__ != "ApiException":
                raise
            raise ApiUnavailable(f"kube-apiserver at {self.server} refused the connection: "
                                 f"{_one_line(str(getattr(exc, 'reason', exc)))[:300]}",
                                 fix="check the kubeconfig's CA and credentials") from None
        try:
            parsed = json.loads(data) if data else {}
        except ValueError:
            parsed = {}
        if status in (401, 403):
            raise ApiUnavailable(f"kube-apiserver refused {method} {path}: HTTP {status} {parsed.get('reason', '')}",
                                 fix="give the kubeconfig's user get, list and update on the selected resources "
                                     "(docs/rotation.md has a Role)")
        return Response(status, parsed if isinstance(parsed, dict) else {})


def _default_kubeconfig() -> Path | None:
    env = os.environ.get("KUBECONFIG", "")
    first = next((p for p in env.split(os.pathsep) if p), None)
    if first:
        return Path(first)
    home = Path.home() / ".kube" / "config"
    if home.is_file() or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return home
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class ApiResource:
    """One resource as the apiserver serves it (from discovery)."""

    name: str  # as given: secrets, deployments.apps
    plural: str
    group_version: str  # v1, apps/v1
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return self.group_version

    def _base(self) -> str:
        return f"/api/{self.group_version}" if "/" not in self.group_version else f"/apis/{self.group_version}"

    def collection(self, namespace: str | None) -> str:
        if self.namespaced and namespace:
            return f"{self._base()}/namespaces/{quote(namespace, safe='')}/{self.plural}"
        return f"{self._base()}/{self.plural}"

    def item(self, namespace: str | None, name: str) -> str:
        return f"{self.collection(namespace if self.namespaced else None)}/{quote(name, safe='')}"


def parse_resources(text: str) -> tuple[str, ...]:
    """``--resources``: comma-separated names as ``kleidi encryption-config`` takes them, without wildcards."""
    names = tuple(part.strip() for part in text.split(","))
    for name in names:
        if "*" in name:
            raise ConfigError(f"--resources: {name!r}: kleidi migrate takes no wildcards",
                              fix="list each resource, e.g. secrets,configmaps (kubectl api-resources lists them)")
        check_resource(name)
    if len(set(names)) != len(names):
        raise ConfigError("--resources: a resource is listed twice", fix="list each resource once")
    return names


def discover(api: KubeApi, name: str) -> ApiResource:
    """The served version, kind and scope of ``name``; a resource that cannot be listed and updated is refused."""
    plural, _, group = name.partition(".")
    if group:
        found = api.request("GET", f"/apis/{group}")
        if found.status == 404:
            raise ConfigError(f"--resources: the apiserver serves no API group {group!r}",
                              fix="check the name with kubectl api-resources")
        group_version = str(found.body.get("preferredVersion", {}).get("groupVersion", ""))
        listing = api.request("GET", f"/apis/{group_version}")
    else:
        group_version = "v1"
        listing = api.request("GET", "/api/v1")
    if listing.status != 200:
        raise ApiUnavailable(f"discovery of {group_version} failed: {listing.reason}",
                             fix="check that the apiserver is healthy (kubectl get --raw /readyz)")
    for entry in listing.body.get("resources", []):
        if entry.get("name") == plural:
            verbs = set(entry.get("verbs", []))
            if not {"list", "get", "update"} <= verbs:
                raise ConfigError(f"--resources: {name!r} cannot be listed and updated (verbs: {sorted(verbs)})",
                                  fix="remove it from --resources")
            return ApiResource(name, plural, group_version, str(entry.get("kind", "")), bool(entry.get("namespaced")))
    raise ConfigError(f"--resources: the apiserver serves no resource {name!r}",
                      fix="check the name with kubectl api-resources (the plural, with its group outside the core "
                          "group, e.g. deployments.apps)")


# ------------------------------------------------------------------------------------------- progress


@dataclass
class Counts:
    listed: int = 0
    rewritten: int = 0
    conflicts: int = 0  # conflicts met (each re-read and retried)
    deleted: int = 0  # gone (404) before it could be rewritten: skipped
    failed: int = 0
    restarts: int = 0  # lists started again because their continue token expired (410)


@dataclass
class ResourceProgress:
    resource: str
    continue_token: str | None = None  # the page in work (None: the first page)
    after: str | None = None  # every object up to this key ("namespace/name") is done
    done: bool = False
    counts: Counts = field(default_factory=Counts)


@dataclass(frozen=True)
class Failure:
    resource: str
    object: str  # namespace/name
    reason: str


@dataclass
class State:
    """What a resumed run needs; written after every batch (0600, replaced atomically)."""

    resources: tuple[str, ...]
    namespace: str | None
    progress: dict[str, ResourceProgress]
    started: float

    def to_json(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "resources": list(self.resources), "namespace": self.namespace,
                "started": self.started, "progress": [asdict(p) for p in self.progress.values()]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        progress = {}
        for item in data["progress"]:
            counts = Counts(**item.pop("counts"))
            progress[item["resource"]] = ResourceProgress(**item, counts=counts)
        return cls(tuple(data["resources"]), data["namespace"], progress, float(data["started"]))

    def save(self, path: Path) -> None:
        """0600, written whole or not at all (the keyring's own atomic write)."""
        write_atomically(path, json.dumps(self.to_json()))


def load_state(path: Path, resources: tuple[str, ...], namespace: str | None, resume: bool) -> State:
    """A new state, or with ``resume`` the saved one (which must be for the same selection)."""
    if not resume:
        if path.exists():
            raise ConfigError(f"a migration was started and not finished: its state is in {path}",
                              fix="add --resume to continue it, or remove the file to start over")
        return State(resources, namespace, {r: ResourceProgress(r) for r in resources}, time.time())
    if not path.is_file():
        raise ConfigError(f"--resume: there is no state file {path}",
                          fix="pass the --state-file of the interrupted run, or run without --resume")
    try:
        state = State.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume: {path} is not a kleidi migrate state file ({type(exc).__name__})",
                          fix="remove it and run without --resume (objects already rewritten are rewritten again, "
                              "which is harmless)") from None
    if state.resources != resources or state.namespace != namespace:
        raise ConfigError(f"--resume: {path} is for --resources {','.join(state.resources)} and "
                          f"{'--namespace ' + state.namespace if state.namespace else 'every namespace'}",
                          fix="resume with the same --resources and --namespace, or remove the file to start over")
    return state


# ------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Options:
    resources: tuple[str, ...] = ("secrets",)
    namespace: str | None = None
    qps: float = DEFAULT_QPS
    concurrency: int = DEFAULT_CONCURRENCY
    page_size: int = DEFAULT_PAGE_SIZE
    retries: int = DEFAULT_RETRIES
    state_file: Path = DEFAULT_STATE_FILE
    resume: bool = False
    stop_after: int | None = None

    def check(self) -> None:
        if not self.qps > 0:
            raise ConfigError(f"--qps {self.qps} is not positive", fix="use e.g. --qps 20")
        if self.concurrency < 1:
            raise ConfigError(f"--concurrency {self.concurrency} is not positive", fix="use e.g. --concurrency 4")
        if not 1 <= self.page_size <= 10_000:
            raise ConfigError(f"--page-size {self.page_size} is not between 1 and 10000", fix="use e.g. 250")
        if self.retries < 0:
            raise ConfigError(f"--retries {self.retries} is negative", fix="use e.g. --retries 5")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(f"--stop-after {self.stop_after} is not positive", fix="use e.g. --stop-after 1000")


@dataclass
class Result:
    state: State
    failures: list[Failure]
    stopped: str | None  # why the run stopped before the end, or None
    seconds: float
    finished: bool  # every selected resource done (failures aside)
    state_file: Path

    def counts(self) -> Counts:
        total = Counts()
        for progress in self.state.progress.values():
            for name, value in asdict(progress.counts).items():
                setattr(total, name, getattr(total, name) + value)
        return total


Progress = Callable[[str, int, int | None], None]
"""Called with (resource, objects handled so far for it, its total when known)."""


def _handled(counts: Counts) -> int:
    return counts.rewritten + counts.deleted + counts.failed


def _key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata", {})
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name')}" if namespace else str(meta.get("name"))


class Migration:
    def __init__(self, api: KubeApi, options: Options, stop: threading.Event | None = None,
                 progress: Progress | None = None) -> None:
        options.check()
        self.api = api
        self.options = options
        self.stop = stop or threading.Event()
        self.progress = progress or (lambda resource, done, total: None)
        self.failures: list[Failure] = []
        self._handled = 0  # objects handled in this run (for --stop-after)
        self._total: int | None = None  # the resource in work's object count, when the apiserver says

    def _stop_reason(self) -> str | None:
        if self.stop.is_set():
            return "interrupted"
        if self.options.stop_after is not None and self._handled >= self.options.stop_after:
            return f"--stop-after {self.options.stop_after} reached"
        return None

    def run(self) -> Result:
        started = time.monotonic()
        opts = self.options
        state = load_state(opts.state_file, opts.resources, opts.namespace, opts.resume)
        resources = [discover(self.api, name) for name in opts.resources]
        for resource in resources:
            if opts.namespace and not resource.namespaced:
                raise ConfigError(f"--resources: {resource.name} is not namespaced, so --namespace cannot select "
                                  "among them", fix=f"migrate {resource.name} in a run without --namespace")
        state.save(opts.state_file)
        stopped: str | None = None
        try:
            for resource in resources:
                progress = state.progress[resource.name]
                if progress.done:
                    continue
                stopped = self._migrate(resource, progress, state)
                if stopped:
                    break
        except ApiUnavailable as exc:
            state.save(opts.state_file)
            raise ApiLost(exc.message + f" (progress is saved in {opts.state_file})",
                                 fix=f"{exc.fix}; then run again with --resume") from None
        state.save(opts.state_file)
        finished = all(p.done for p in state.progress.values())
        if finished:
            opts.state_file.unlink()  # nothing to resume: a new run starts over
        return Result(state, self.failures, stopped, time.monotonic() - started, finished, opts.state_file)

    def _pages(self, resource: ApiResource, progress: ResourceProgress
               ) -> Iterator[tuple[list[dict[str, Any]], str | None, str | None, int | None]]:
        """Each page's items not done yet, the continue token of the page after it, the page's last key,
        and how many objects are left from this page on (when the apiserver says), from where ``progress``
        stands.
        An expired continue token (410) restarts the list from the beginning; ``progress.after`` skips
        what was done."""
        token = progress.continue_token
        while True:
            query: list[tuple[str, Any]] = [("limit", self.options.page_size)]
            if token:
                query.append(("continue", token))
            page = self.api.request("GET", resource.collection(self.options.namespace), query)
            if page.status == 410 and token:
                token = None
                progress.continue_token = None
                progress.counts.restarts += 1
                continue
            if page.status != 200:
                raise ApiUnavailable(f"listing {resource.name} failed: {page.reason}",
                                     fix="check the apiserver's health and the user's list permission")
            meta = page.body.get("metadata", {})
            next_token = meta.get("continue") or None
            raw = page.body.get("items") or []
            items = [item for item in raw if progress.after is None or _key(item) > progress.after]
            remaining = meta.get("remainingItemCount")
            last = _key(raw[-1]) if raw else None
            if progress.after is not None and (last is None or last < progress.after):
                last = progress.after  # a list started again is behind what was done: never move back
            yield items, next_token, last, len(items) + int(remaining) if isinstance(remaining, int) else None
            if not next_token:
                return
            token = next_token

    def _migrate(self, resource: ApiResource, progress: ResourceProgress, state: State) -> str | None:
        self.progress(resource.name, _handled(progress.counts), None)
        with ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="migrate") as pool:
            for items, next_token, last_key, left in self._pages(resource, progress):
                progress.counts.listed += len(items)
                self._total = _handled(progress.counts) + left if left is not None else None
                stopped = self._batch(pool, resource, progress, items)
                if stopped:
                    state.save(self.options.state_file)
                    return stopped
                progress.continue_token, progress.after = next_token, last_key
                state.save(self.options.state_file)
                if self._stop_reason():  # between pages: the state already points at the next one
                    return self._stop_reason()
        progress.done = True
        state.save(self.options.state_file)
        return None

    def _batch(self, pool: ThreadPoolExecutor, resource: ApiResource, progress: ResourceProgress,
               items: list[dict[str, Any]]) -> str | None:
        """Rewrite one page's items, at most ``concurrency`` at a time, in order; on a stop, wait for
        those in flight and record the last key before which everything is done."""
        done = [False] * len(items)
        through = -1
        in_flight: dict[Future[str], int] = {}
        next_index = 0
        stopped: str | None = None
        while next_index < len(items) or in_flight:
            while next_index < len(items) and len(in_flight) < self.options.concurrency and not stopped:
                stopped = self._stop_reason()
                if stopped:
                    break
                in_flight[pool.submit(self._rewrite, resource, items[next_index])] = next_index
                next_index += 1
                self._handled += 1
            if not in_flight:
                break
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                index = in_flight.pop(future)
                outcome = future.result()  # ApiUnavailable propagates: the state keeps the last good point
                if outcome.startswith("failed"):
                    progress.counts.failed += 1
                    self.failures.append(Failure(resource.name, _key(items[index]), outcome[len("failed: "):]))
                elif outcome == "deleted":
                    progress.counts.deleted += 1
                else:
                    progress.counts.rewritten += 1
                progress.counts.conflicts += outcome.count("conflict")
                done[index] = True
            while through + 1 < len(items) and done[through + 1]:
                through += 1
            if through >= 0:
                progress.after = _key(items[through])
            self.progress(resource.name, _handled(progress.counts), self._total)
            if stopped is None:
                stopped = self._stop_reason() if next_index < len(items) else None
        return stopped

    def _rewrite(self, resource: ApiResource, obj: dict[str, Any]) -> str:
        """Put one object back unchanged. Returns ``rewritten`` (with one ``conflict`` per conflict met),
        ``deleted``, or ``failed: <reason>``."""
        meta = obj.get("metadata", {})
        path = resource.item(meta.get("namespace"), str(meta.get("name")))
        conflicts = ""
        server_errors = 0
        attempt = 0
        while True:
            body = {**obj, "apiVersion": resource.api_version, "kind": resource.kind}
            answer = self.api.request("PUT", path, [("fieldManager", FIELD_MANAGER)], body)
            if answer.status in (200, 201):
                return "rewritten" + conflicts
            if answer.status == 404:
                return "deleted"
            if answer.status == 409 and answer.body.get("reason") == "Conflict":
                attempt += 1
                if attempt > self.options.retries:
                    return f"failed: still changing after {self.options.retries} retries ({answer.reason})"
                conflicts += " conflict"
                fresh = self.api.request("GET", path)
                if fresh.status == 404:
                    return "deleted"
                if fresh.status != 200:
                    return f"failed: re-reading after a conflict: {fresh.reason}"
                obj = fresh.body
                continue
            if answer.status == 429 or answer.status >= 500:
                server_errors += 1
                if server_errors > self.options.retries:
                    return f"failed: {answer.reason} after {self.options.retries} retries"
                time.sleep(_SERVER_ERROR_BACKOFF * server_errors)
                continue
            return f"failed: {answer.reason}"


# ---------------------------------------------------------------------------------------------- proof


@dataclass
class Proof:
    """The scan of etcd that ends a migration: is any selected object left on an old key_id?"""

    checked: bool
    passed: bool
    message: str
    old_key_ids: list[str] = field(default_factory=list)
    left: int = 0  # selected objects still on an old key_id
    key_ids: dict[str, int] = field(default_factory=dict)  # every KMS v2 key_id found, with its objects
    scan: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def skipped_proof() -> Proof:
    return Proof(checked=False, passed=False,
                 message="not proven: no etcd access was given (--etcd-endpoints), so nothing checked that every "
                         "object left the old key_id; run kleidi scan with --fail-if key-id=<old key_id>")


def prove(reader: Any, prefix: str, resources: tuple[str, ...], old_key_ids: tuple[str, ...],
          current_key_id: str | None, progress: Callable[[int, int], None] | None = None) -> Proof:
    """Scan the selected resources in etcd (:func:`kleidi.tools.scan.scan`) and count what is left on an
    old key_id: the ``old_key_ids`` given; else every key_id but ``current_key_id``; else, knowing neither,
    the proof passes only when every KMS v2 object is on one key_id."""
    from kleidi.tools.scan import Condition, scan

    result = scan(reader, prefix, resources, reference=None, progress=progress)
    key_ids = result.key_ids()
    if old_key_ids:
        old = list(old_key_ids)
    elif current_key_id is not None:
        old = [key_id for key_id in key_ids if key_id != current_key_id]
    elif len(key_ids) > 1:
        return Proof(checked=True, passed=False, key_ids=key_ids, scan=result.as_dict(),
                     left=sum(key_ids.values()) - max(key_ids.values()),
                     message=f"the selected objects are on {len(key_ids)} key_ids and none was named old: pass "
                             "--old-key-id, or --endpoint to compare with the current key_id")
    else:
        old = []
    conditions = [Condition("key-id", key_id) for key_id in old]
    left = sum(key_ids.get(c.key_id or "", 0) for c in conditions)
    where = f"{result.objects} objects under {result.prefix}/ at etcd revision {result.revision}"
    if left:
        message = f"{left} objects are still on an old key_id ({where}): run kleidi migrate again"
    elif old:
        message = f"no object is left on {', '.join(old)} ({where})"
    else:
        message = f"every KMS v2 object is on {next(iter(key_ids), 'no key_id')} ({where})"
    return Proof(checked=True, passed=left == 0, message=message, old_key_ids=old, left=left, key_ids=key_ids,
                 scan=result.as_dict())


# -------------------------------------------------------------------------------------------- output


EXIT_OK = 0
EXIT_FAILED = 1  # objects failed, or the proof found objects left on an old key_id
EXIT_USAGE = 2
EXIT_STOPPED = 3  # interrupted or --stop-after: progress saved, run again with --resume
EXIT_UNPROVEN = 4  # every object rewritten, but no etcd access to prove it


def exit_code(result: Result, proof: Proof | None) -> int:
    if not result.finished:
        return EXIT_STOPPED
    if result.failures or (proof is not None and proof.checked and not proof.passed):
        return EXIT_FAILED
    if proof is None or not proof.checked:
        return EXIT_UNPROVEN
    return EXIT_OK


def as_dict(result: Result, proof: Proof | None, server: str) -> dict[str, Any]:
    return {"server": server, "finished": result.finished, "stopped": result.stopped,
            "state_file": str(result.state_file),
            "seconds": round(result.seconds, 3), "totals": asdict(result.counts()),
            "resources": [{"resource": p.resource, "done": p.done, **asdict(p.counts)}
                          for p in result.state.progress.values()],
            "failures": [asdict(f) for f in result.failures],
            "proof": proof.as_dict() if proof is not None else None, "exit_code": exit_code(result, proof)}


def table_rows(result: Result) -> list[tuple[Any, ...]]:
    """resource, done, listed, rewritten, conflicts retried, deleted meanwhile, failed."""
    return [(p.resource, p.done, p.counts.listed, p.counts.rewritten, p.counts.conflicts, p.counts.deleted,
             p.counts.failed) for p in result.state.progress.values()]


def summary(result: Result, proof: Proof | None) -> list[str]:
    totals = result.counts()
    lines = [f"{totals.rewritten} objects rewritten in {result.seconds:.1f} s"]
    for failure in result.failures[:20]:
        lines.append(f"failed: {failure.resource} {failure.object}: {failure.reason}")
    if len(result.failures) > 20:
        lines.append(f"... and {len(result.failures) - 20} more failures (--output json lists them all)")
    if not result.finished:
        lines.append(f"stopped ({result.stopped}): progress is saved in {result.state_file}; "
                     "run the same command with --resume to continue")
    elif proof is not None:
        lines.append(("proof: " if proof.checked else "") + proof.message)
    return lines


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    """A rich progress bar per resource on stderr (only when ``enabled``: stderr is a terminal)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("rewriting {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(resource: str, done: int, total: int | None) -> None:
            if resource not in tasks:
                tasks[resource] = bar.add_task(resource, total=None)
            bar.update(tasks[resource], completed=done, total=total)

        yield update


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM ask the run to stop after the requests in flight (progress is saved); more of
    them change nothing (SIGKILL loses at most the page in work, which a resumed run does again)."""
    import signal

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------- command


@dataclass(frozen=True)
class CliArgs:
    """``kleidi migrate``'s flags, as click parsed them."""

    kubeconfig: Path | None
    context: str | None
    resources: str
    namespace: str | None
    qps: float
    concurrency: int
    page_size: int
    retries: int
    state_file: Path
    resume: bool
    stop_after: int | None
    etcd_endpoints: str | None
    etcd_cert: Path | None
    etcd_key: Path | None
    etcd_ca: Path | None
    prefix: str
    old_key_ids: tuple[str, ...]
    endpoint: str | None
    output: str


def main(args: CliArgs) -> int:
    """Run ``kleidi migrate``; its exit code. Errors before the run raise (exit 2); a lost apiserver
    during it raises :class:`ApiLost` (exit 3)."""
    import sys

    from kleidi.cli_support import print_table

    options = Options(parse_resources(args.resources), args.namespace or None, args.qps, args.concurrency,
                      args.page_size, args.retries, args.state_file, args.resume, args.stop_after)
    options.check()
    reader = None
    if args.etcd_endpoints:
        from kleidi.etcd import EtcdOptions, EtcdReader

        reader = EtcdReader(EtcdOptions(tuple(e for e in args.etcd_endpoints.split(",") if e.strip()),
                                        args.etcd_cert, args.etcd_key, args.etcd_ca))
        reader.snapshot(args.prefix.encode())  # unreachable etcd: fail now, not after the whole run
    elif args.etcd_cert or args.etcd_key or args.etcd_ca or args.old_key_ids:
        raise ConfigError("--etcd-cert, --etcd-key, --etcd-ca and --old-key-id are for the proof, which reads etcd",
                          fix="add --etcd-endpoints (kube-apiserver's --etcd-servers)")
    current = None
    if args.endpoint is not None:
        from kleidi.tools.scan import reference_from_endpoint

        current = reference_from_endpoint(args.endpoint).current
    api = KubeApi.connect(args.kubeconfig, args.context, options.qps, options.concurrency)
    stop = threading.Event()
    with stop_on_signals(stop), progress_bar(sys.stderr.isatty()) as bar:
        result = Migration(api, options, stop, bar).run()
    proof = None
    if result.finished:
        if reader is None:
            proof = skipped_proof()
        else:
            from kleidi.tools.scan import progress_bar as scan_progress_bar

            with scan_progress_bar(sys.stderr.isatty()) as scan_progress:
                proof = prove(reader, args.prefix, options.resources, args.old_key_ids, current, scan_progress)
    if args.output == "json":
        print(json.dumps(as_dict(result, proof, api.server), indent=2))
    else:
        print_table(f"kleidi migrate through {api.server}",
                    ("resource", "done", "listed", "rewritten", "conflicts retried", "deleted meanwhile", "failed"),
                    table_rows(result))
        for line in summary(result, proof):
            print(line)
    return exit_code(result, proof)
