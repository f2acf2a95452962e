"""Where the controller's objects come from: the Kubernetes API, or a directory of manifests.

Both feed a :class:`Store`, the local copy of the last known objects, and tell it what
changed. Only this module (with the appliers) touches the world: the API's list/watch through
the official ``kubernetes`` client, or the files of a directory.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from kpgen.core.fields import printable
from kpgen.inputs.manifests import MANIFEST_SUFFIXES, InputError, load_documents

log = logging.getLogger("kpgen.sources")  # the log name users filter on, kept

SERVICE, SLICE, NODE = "Service", "EndpointSlice", "Node"
API_VERSIONS = {SERVICE: "v1", SLICE: "discovery.k8s.io/v1", NODE: "v1"}
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
# kube-proxy's informers leave these services out on the server side.
SERVICE_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
# Seconds between an informer's retries at most (0.5 s, 1 s, 2 s, then 3 s, jittered): once the
# API answers again, kpgen notices within this and syncs the first change within ~5 s.
RETRY_CAP = 3.0
# At most this many programming-latency observations wait for the next sync (an initial list
# that never completes, say a Node list refused with 403, would otherwise grow them forever).
MAX_TRIGGERS = 1000
NOTE_INTERVAL = 60.0  # seconds: a recurring note (410 Gone, a dropped stream) once per this


# metadata that kpgen reads; the rest (managedFields, last-applied-configuration, owner
# references, ...) is dropped when an object enters the store: it is most of an object's size
_METADATA = ("name", "namespace", "labels", "creationTimestamp", "resourceVersion")
_ANNOTATIONS = (TRIGGER_TIME,)


def typed(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """An object of a list with its kind and apiVersion (a list's items carry none, and the
    parser needs them), without the metadata kpgen never reads."""
    typed = {**obj, "kind": kind, "apiVersion": API_VERSIONS.get(kind, obj.get("apiVersion"))}
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        kept = {k: meta[k] for k in _METADATA if k in meta}
        notes = meta.get("annotations")
        if isinstance(notes, dict) and any(k in notes for k in _ANNOTATIONS):
            kept["annotations"] = {k: notes[k] for k in _ANNOTATIONS if k in notes}
        typed["metadata"] = kept
    return typed


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _trigger_time(obj: dict[str, Any], received: float) -> float:
    """When the change behind ``obj`` happened: the EndpointSlice controller's annotation,
    else the time it reached us."""
    stamp = ((obj.get("metadata") or {}).get("annotations") or {}).get(TRIGGER_TIME)
    if isinstance(stamp, str):
        try:
            return float(calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")))
        except ValueError:
            pass
    return received


@dataclass
class Snapshot:
    """The changes since the previous snapshot."""

    service_changes: int = 0
    # the new version of each object that changed (None: deleted), by (kind, namespace, name)
    changed: dict[tuple[str, str, str], dict[str, Any] | None] = field(default_factory=dict)
    endpoint_changes: int = 0
    triggers: list[float] = field(default_factory=list)
    first_change: float | None = None  # wall time of the oldest change in it


def version(obj: dict[str, Any]) -> str | bytes:
    """What the store keeps of an object, to tell whether it changed: its resourceVersion,
    which the API server moves on at every write of it (the objects themselves live on
    parsed in kpgen.core.index); for an object without one, 16 bytes that differ when it
    does (BLAKE2b of its canonical JSON: 6 us an object, 0.13 s for a first list of 10,000
    services and their slices, where the resourceVersion is free)."""
    stamp = (obj.get("metadata") or {}).get("resourceVersion")
    if isinstance(stamp, str) and stamp:
        return stamp
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class Store:
    """What is known of each kind's objects (the :func:`version` of each, by namespace and
    name), thread-safe, with what changed since the last :meth:`take`: the objects
    themselves. ``on_change`` is called (outside the lock) after every change."""

    def __init__(self, kinds: Iterable[str], on_change: Callable[[], None] = lambda: None):
        self._cond = threading.Condition()
        self._versions: dict[str, dict[tuple[str, str], str | bytes]] = {k: {} for k in kinds}
        self._synced: set[str] = set()
        self._on_change = on_change
        self._changes = Snapshot()
        self._started = time.time()

    def _note(
        self, kind: str, key: tuple[str, str], obj: dict[str, Any] | None, deleted: bool = False
    ) -> None:
        now = time.time()
        changes = self._changes
        changes.changed[(kind, *key)] = None if deleted else obj
        if changes.first_change is None:
            changes.first_change = now
        if kind == SERVICE:
            changes.service_changes += 1
        elif kind == SLICE:
            changes.endpoint_changes += 1
            # As kube-proxy: no programming latency for deletions, nor for changes made
            # before this process started (their age is not our latency).
            trigger = _trigger_time(obj or {}, now)
            if (
                not deleted
                and trigger >= int(self._started)  # the annotation has seconds
                and len(changes.triggers) < MAX_TRIGGERS  # the oldest are the ones that matter
            ):
                changes.triggers.append(trigger)

    def replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        """The complete list of ``kind`` (after a list): differences count as changes."""
        fresh = {_key(o): typed(kind, o) for o in objects}
        versions = {key: version(obj) for key, obj in fresh.items()}
        with self._cond:
            old = self._versions[kind]
            for key in old.keys() | fresh.keys():
                if old.get(key) != versions.get(key):
                    self._note(kind, key, fresh.get(key), deleted=key not in fresh)
            self._versions[kind] = versions
            notify = self._listed(kind)
        if notify:
            self._on_change()

    def preview(self, kind: str, seen: set[tuple[str, str]], page: list[dict[str, Any]]) -> None:
        """A page of the first list of ``kind``, before the list is complete: each object
        whose version is new is a change at once, so that the controller can parse it while
        the rest arrives (:meth:`take_objects`). ``seen``: the keys of this list so far, for
        :meth:`previewed`."""
        entries = [(_key(obj), typed(kind, obj)) for obj in page]
        with self._cond:
            for key, entry in entries:
                seen.add(key)
                self._set(kind, key, entry)
            self._cond.notify_all()

    def _set(self, kind: str, key: tuple[str, str], entry: dict[str, Any]) -> bool:
        """``entry`` as the object of ``kind`` at ``key`` (under the lock): whether it is a
        new version (then noted as a change)."""
        new, versions = version(entry), self._versions[kind]
        if versions.get(key) == new:
            return False
        versions[key] = new
        self._note(kind, key, entry)
        return True

    def previewed(self, kind: str, seen: set[tuple[str, str]]) -> None:
        """The first list of ``kind`` is complete, its pages seen by :meth:`preview` (keys
        ``seen``): as :meth:`replace`, what it did not list (an earlier, failed list's) is gone."""
        with self._cond:
            versions = self._versions[kind]
            for key in [key for key in versions if key not in seen]:
                del versions[key]
                self._note(kind, key, None, deleted=True)
            notify = self._listed(kind)
        if notify:
            self._on_change()

    def _listed(self, kind: str) -> bool:
        """``kind`` listed (under the lock); whether to call ``on_change``."""
        notify = kind not in self._synced or self._changes.first_change is not None
        self._synced.add(kind)
        self._cond.notify_all()
        return notify

    def listed_once(self, kind: str) -> bool:
        with self._cond:
            return kind in self._synced

    def apply(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        """One watch event (ADDED, MODIFIED, DELETED)."""
        key = _key(obj)
        entry = typed(kind, obj) if event != "DELETED" else None
        with self._cond:
            if entry is None:
                if self._versions[kind].pop(key, None) is None:
                    return
                self._note(kind, key, None, deleted=True)
            elif not self._set(kind, key, entry):
                return
            self._cond.notify_all()
        self._on_change()

    @property
    def synced(self) -> bool:
        with self._cond:
            return self._synced == set(self._versions)

    def pending(self) -> bool:
        with self._cond:
            return self._changes.first_change is not None

    def pending_since(self) -> float | None:
        """Wall time of the oldest change not yet taken."""
        with self._cond:
            return self._changes.first_change

    def pending_counts(self) -> tuple[int, int]:
        """(service changes, endpoint changes) not yet taken."""
        with self._cond:
            return self._changes.service_changes, self._changes.endpoint_changes

    def wait(self, timeout: float, until: Callable[[], bool]) -> bool:
        """Wait up to ``timeout`` seconds for ``until()`` (checked under the store's lock)."""
        with self._cond:
            return self._cond.wait_for(until, timeout)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def count(self) -> int:
        """How many objects are known, of every kind."""
        with self._cond:
            return sum(len(versions) for versions in self._versions.values())

    def objects_waiting(self) -> bool:
        with self._cond:
            return bool(self._changes.changed)

    def take_objects(self) -> dict[tuple[str, str, str], dict[str, Any] | None]:
        """The changed objects so far (as :meth:`take` would give them), leaving the rest of
        the changes (their counts, their times) to the next :meth:`take`."""
        with self._cond:
            changed, self._changes.changed = self._changes.changed, {}
        return changed

    def take(self) -> Snapshot:
        """The changes since the last take: each changed object whole (None: deleted)."""
        with self._cond:
            changes, self._changes = self._changes, Snapshot()
        return changes


class Backoff:
    """Exponential backoff with jitter and a cap: 0.5 s, 1 s, 2 s, ... (each ±20 %), never
    more than ``cap``."""

    def __init__(self, initial: float = 0.5, cap: float = 30.0) -> None:
        self.initial, self.cap, self.failures = initial, cap, 0

    def next(self) -> float:
        delay = self.initial * 2 ** min(self.failures, 32) * random.uniform(0.8, 1.2)
        self.failures += 1
        return float(min(self.cap, delay))

    def reset(self) -> None:
        self.failures = 0


# --- the Kubernetes API -----------------------------------------------------------------


def api_client(kubeconfig: str | None, master: str | None) -> Any:
    """A configured ``kubernetes`` ApiClient: --kubeconfig, else in-cluster (the service
    account, KUBERNETES_SERVICE_HOST/PORT), else the default kubeconfig; --master overrides
    the server."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(client_configuration=configuration)
    if master:
        configuration.host = master
    return client.ApiClient(configuration)


class Gone(Exception):
    """The resourceVersion is too old (410): list again."""


LIST_PAGE = 500  # items per list request, as client-go's pager asks


def list_pages(
    call: Callable[..., Any], on_page: Callable[[list[dict[str, Any]]], None] | None = None
) -> tuple[list[dict[str, Any]], str]:
    """Every item of a list, a page at a time (``limit`` and ``continue``, as client-go's
    pager), and the list's resourceVersion; with ``on_page``, each page's items go to it as
    they come instead (none are returned). An expired continue token (410) raises
    ``ApiException``; the caller lists again."""
    import json

    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        paging: dict[str, Any] = {"limit": LIST_PAGE}
        if token:
            paging["_continue"] = token
        response = call(_preload_content=False, _request_timeout=(10, 60), **paging)
        body = json.loads(response.data)
        page = [i for i in body.get("items") or [] if isinstance(i, dict)]
        if on_page is not None:
            on_page(page)
        else:
            items.extend(page)
        metadata = body.get("metadata") or {}
        token = metadata.get("continue")
        if not token:
            return items, str(metadata.get("resourceVersion") or "")


def describe_error(error: BaseException) -> tuple[str, str]:
    """What went wrong with an API call, for a log line, and a key that is the same for the
    same fault (the status, or the exception's type)."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(error, ApiException):
        said = f"{error.status} {error.reason}"
        if error.status in (401, 403):
            said += " (check kpgen's credentials and its ClusterRole: it lists and watches"
            said += " services, endpointslices and nodes)"
        return said, f"http {error.status}"
    reason = getattr(error, "reason", None)  # urllib3's MaxRetryError: why the retries failed
    shown = reason if isinstance(reason, BaseException) else error
    text = re.sub(r"^<[^>]*>: ", "", str(shown).strip().split("\n")[0])  # urllib3's own repr
    text = re.sub(r"\(Caused by .*", "", text).strip()
    return printable(f"{type(shown).__name__}: {text}" if text else type(shown).__name__)[
        :300
    ], type(shown).__name__


class Trouble:
    """How an informer reports failures: one warning when they start (or turn into another
    fault), one line when the API answers again, and each retry in between only at debug
    level. A fault that comes back within a minute of its last warning (a flapping stream) is
    not warned about again until that minute is over. Recurring notes that are not failures
    (410 Gone, a dropped stream) are logged once a minute, with how many there were since."""

    def __init__(self, kind: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.kind, self.clock = kind, clock
        self.failures = 0
        self.since: float | None = None
        self.key: str | None = None
        self.logged = False  # this streak's start was logged: its end will be too
        self._warned: dict[str, float] = {}  # fault key: when last warned about
        self._notes: dict[str, tuple[float, int]] = {}  # key: (when logged, how many since)

    def failed(self, what: str, key: str, delay: float) -> None:
        self.failures += 1
        now = self.clock()
        if self.since is None or key != self.key:
            self.since = self.since if self.since is not None else now
            self.key = key
            if now - self._warned.get(key, -NOTE_INTERVAL) >= NOTE_INTERVAL:
                self._warned[key] = now
                self.logged = True
                log.warning(
                    "%s: %s; retrying every %.0fs at most until it works (retries are logged"
                    " at -v)",
                    self.kind,
                    what,
                    RETRY_CAP,
                    extra={"kind": self.kind, "fault": key},
                )
                return
        log.debug("%s: %s (failure %d); retrying in %.1fs", self.kind, what, self.failures, delay)

    def worked(self) -> None:
        if self.since is None:
            return
        log.log(
            logging.INFO if self.logged else logging.DEBUG,
            "%s: the API server answers again, after %d failed attempts in %.1fs",
            self.kind,
            self.failures,
            self.clock() - self.since,
            extra={"kind": self.kind, "failures": self.failures},
        )
        self.failures, self.since, self.key, self.logged = 0, None, None, False

    def note(self, key: str, message: str, *args: Any) -> None:
        now = self.clock()
        logged, count = self._notes.get(key, (-NOTE_INTERVAL, 0))
        if now - logged < NOTE_INTERVAL:
            self._notes[key] = (logged, count + 1)
            log.debug("%s: " + message, self.kind, *args)
            return
        again = f" ({count} more in the last {now - logged:.0f}s)" if count else ""
        log.info("%s: " + message + again, self.kind, *args)
        self._notes[key] = (now, 0)


class Informer(threading.Thread):
    """List, then watch from the list's resourceVersion, for one kind, into the store: relist
    on 410 Gone, resume a dropped stream from the last version seen, back off on errors (at
    most :data:`RETRY_CAP` seconds apart)."""

    def __init__(
        self,
        store: Store,
        kind: str,
        call: Callable[..., Any],
        stop: threading.Event,
        watch_timeout: int = 300,
    ) -> None:
        super().__init__(name=f"informer-{kind}", daemon=True)
        self.store, self.kind, self.call, self.stop = store, kind, call, stop
        self.watch_timeout = watch_timeout
        self.backoff = Backoff(cap=RETRY_CAP)
        self.trouble = Trouble(kind)

    def run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        while not self.stop.is_set():
            try:
                version = self._list()
                self._watch(version)
            except Gone:
                self.trouble.note("410", "resourceVersion expired (410 Gone): listing again")
            except ApiException as error:
                if error.status == 410:  # a list's continue token expired
                    self.trouble.note("410", "list expired (410 Gone): listing again")
                    continue
                self._pause("list", error)
            except Exception as error:  # a dropped connection, a bad answer: retry later
                self._pause("list", error)

    def _pause(self, what: str, error: BaseException) -> None:
        said, key = describe_error(error)
        delay = self.backoff.next()
        self.trouble.failed(f"{what} failed ({said})", key, delay)
        self.stop.wait(delay)

    def _list(self) -> str:
        if self.store.listed_once(self.kind):  # compared whole, at its end
            items, version = list_pages(self.call)
            self.trouble.worked()
            self.store.replace(self.kind, items)
            count = len(items)
        else:  # the first: a page at a time, for the controller to parse while the rest comes
            seen: set[tuple[str, str]] = set()
            _, version = list_pages(self.call, partial(self.store.preview, self.kind, seen))
            self.trouble.worked()
            self.store.previewed(self.kind, seen)
            count = len(seen)
        self.backoff.reset()
        log.debug("%s: listed %d at resourceVersion %s", self.kind, count, version)
        return version

    def _watch(self, version: str) -> None:
        """Watch until the stop event or a 410; a stream that ends or drops is resumed."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        def call(**kwargs: Any) -> Any:  # no docstring: the client then yields raw dicts
            return self.call(**kwargs)

        while not self.stop.is_set():
            timeout = int(self.watch_timeout * random.uniform(1.0, 1.5))
            stream = watch.Watch().stream(
                call,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                _request_timeout=(10, timeout + 30),
            )
            received = 0
            try:
                for event in stream:
                    version = self._event(event) or version
                    received += 1
                    if self.stop.is_set():
                        return
            except ApiException as error:
                if error.status == 410:
                    raise Gone() from None
                self._pause("watch", error)
            except Gone:
                raise
            except Exception as error:
                if received:
                    # a stream that worked broke (a load balancer, a restarting server):
                    # resume at once from the last version seen, as client-go does
                    said, _ = describe_error(error)
                    self.trouble.note(
                        "dropped",
                        "watch stream dropped (%s); resuming from resourceVersion %s",
                        said,
                        version,
                    )
                else:  # nothing came through it: a failure like any other, backed off
                    self._pause("watch", error)
            else:
                self.backoff.reset()

    def _event(self, event: dict[str, Any]) -> str | None:
        kind, obj = event.get("type"), event.get("raw_object") or event.get("object")
        if not isinstance(obj, dict):
            return None
        self.backoff.reset()  # the stream works again, bookmarks included
        self.trouble.worked()
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise RuntimeError(f"watch error: {obj.get('message')}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self.store.apply(self.kind, str(kind), obj)
        return str(version) if version else None


# The query parameters of a list or watch, as the API spells them, by the keyword arguments
# the client's Watch and list_pages pass (named as the generated list methods name them).
_QUERY = {
    "allow_watch_bookmarks": "allowWatchBookmarks",
    "_continue": "continue",
    "field_selector": "fieldSelector",
    "label_selector": "labelSelector",
    "limit": "limit",
    "resource_version": "resourceVersion",
    "timeout_seconds": "timeoutSeconds",
    "watch": "watch",
}


def _lister(api: Any, path: str, **fixed: Any) -> Callable[..., Any]:
    """A list (or, with ``watch=True``, watch) call of ``path`` through the client's ApiClient,
    as the generated ``list_*`` methods make it with ``_preload_content=False``: the raw
    response, an ApiException for a status that is not 2xx. The generated API classes are left
    out: importing CoreV1Api imports hundreds of models (22 MB resident, 0.3 s of start-up)
    for two calls whose answers kpgen reads as JSON anyway."""
    from kubernetes.client.exceptions import ApiException

    # _preload_content: Watch and list_pages both pass False; the raw response is all there is
    def call(_request_timeout: Any = None, _preload_content: bool = False, **kwargs: Any) -> Any:
        query = [(_QUERY[key], value) for key, value in {**fixed, **kwargs}.items()]
        request = api.param_serialize(
            method="GET",
            resource_path=path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = api.call_api(*request, _request_timeout=_request_timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response

    return call


def api_lists(api: Any, node_name: str) -> dict[str, Callable[..., Any]]:
    """The list calls of kpgen run, by kind: Services (less those kube-proxy leaves alone),
    EndpointSlices, and this node."""
    return {
        SERVICE: _lister(api, "/api/v1/services", label_selector=SERVICE_SELECTOR),
        SLICE: _lister(api, "/apis/discovery.k8s.io/v1/endpointslices"),
        NODE: _lister(api, "/api/v1/nodes", field_selector=f"metadata.name={node_name}"),
    }


def api_informers(store: Store, api: Any, node_name: str, stop: threading.Event) -> list[Informer]:
    """The informers of kpgen run: Services, EndpointSlices and this node."""
    return [Informer(store, kind, call, stop) for kind, call in api_lists(api, node_name).items()]


class ApiListError(Exception):
    """A list through the API failed: the message names the kind, the server and why."""


def list_cluster(api: Any, node_name: str) -> list[dict[str, Any]]:
    """What ``kpgen run`` would hold once synced, listed once through the same calls: for a
    dry run against a live cluster (``kpgen render --kubeconfig``)."""
    from kubernetes.client.exceptions import ApiException

    documents: list[dict[str, Any]] = []
    for kind, call in api_lists(api, node_name).items():
        where = f"{kind} list from {api.configuration.host}"
        try:
            items, _ = list_pages(call)
        except ApiException as error:
            raise ApiListError(f"{where}: {error.status} {error.reason}") from None
        except Exception as error:  # refused, unreachable, TLS, not JSON
            first_line = printable(str(error).strip().split("\n")[0])
            raise ApiListError(f"{where}: {type(error).__name__}: {first_line}") from None
        documents.extend(typed(kind, item) for item in items)
    return documents


# --- a directory of manifests -----------------------------------------------------------


class ManifestWatcher(threading.Thread):
    """Reads a directory of manifests into the store, and again whenever its files change
    (checked every ``interval`` seconds). Unreadable files are logged; the last good
    objects stay."""

    def __init__(self, store: Store, directory: str, stop: threading.Event, interval: float = 1.0):
        super().__init__(name="manifests", daemon=True)
        self.store, self.directory, self.stop, self.interval = store, directory, stop, interval

    def _signature(self) -> tuple[tuple[str, int, int], ...]:
        try:
            files = sorted(Path(self.directory).iterdir())
        except OSError:
            return ()
        return tuple(
            (p.name, p.stat().st_mtime_ns, p.stat().st_size)
            for p in files
            if p.suffix in MANIFEST_SUFFIXES and p.is_file()
        )

    def read(self) -> bool:
        try:
            documents = load_documents([self.directory])
        except InputError as error:
            log.error("manifests: %s (keeping the last good objects)", error)
            return False
        for kind in (SERVICE, SLICE, NODE):
            self.store.replace(
                kind, [d for d in documents if isinstance(d, dict) and d.get("kind") == kind]
            )
        return True

    def run(self) -> None:
        seen = None
        while not self.stop.is_set():
            signature = self._signature()
            if signature != seen and self.read():
                seen = signature
            self.stop.wait(self.interval)
