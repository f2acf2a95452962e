"""Where the controller's objects come from: the Kubernetes API, or a directory of manifests.

Both feed a :class:`Store`, the local copy of the last known objects, and tell it what
changed. Only this module (with the appliers) touches the world: the API's list/watch through
the official ``kubernetes`` client, or the files of a directory.
"""

from __future__ import annotations

import calendar
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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


def typed(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """An object of a list with its kind and apiVersion: a list's items carry none, and the
    parser needs them."""
    return {**obj, "kind": kind, "apiVersion": API_VERSIONS.get(kind, obj.get("apiVersion"))}


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
    """The objects at one moment, and the changes since the previous snapshot."""

    documents: list[dict[str, Any]]
    service_changes: int = 0
    endpoint_changes: int = 0
    triggers: list[float] = field(default_factory=list)
    first_change: float | None = None  # wall time of the oldest change in it


class Store:
    """The last known objects of each kind, thread-safe, with what changed since the last
    :meth:`take`. ``on_change`` is called (outside the lock) after every change."""

    def __init__(self, kinds: Iterable[str], on_change: Callable[[], None] = lambda: None):
        self._cond = threading.Condition()
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in kinds}
        self._synced: set[str] = set()
        self._on_change = on_change
        self._changes = Snapshot([])
        self._started = time.time()

    def _note(self, kind: str, obj: dict[str, Any] | None, deleted: bool = False) -> None:
        now = time.time()
        changes = self._changes
        if changes.first_change is None:
            changes.first_change = now
        if kind == SERVICE:
            changes.service_changes += 1
        elif kind == SLICE:
            changes.endpoint_changes += 1
            # As kube-proxy: no programming latency for deletions, nor for changes made
            # before this process started (their age is not our latency).
            trigger = _trigger_time(obj or {}, now)
            if not deleted and trigger >= int(self._started):  # the annotation has seconds
                changes.triggers.append(trigger)

    def replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        """The complete list of ``kind`` (after a list): differences count as changes."""
        fresh = {_key(o): typed(kind, o) for o in objects}
        with self._cond:
            old = self._objects[kind]
            for key in old.keys() | fresh.keys():
                if old.get(key) != fresh.get(key):
                    self._note(kind, fresh.get(key) or old.get(key), deleted=key not in fresh)
            self._objects[kind] = fresh
            notify = kind not in self._synced or self._changes.first_change is not None
            self._synced.add(kind)
            self._cond.notify_all()
        if notify:
            self._on_change()

    def apply(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        """One watch event (ADDED, MODIFIED, DELETED)."""
        key = _key(obj)
        with self._cond:
            objects = self._objects[kind]
            if event == "DELETED":
                if objects.pop(key, None) is None:
                    return
            else:
                entry = typed(kind, obj)
                if objects.get(key) == entry:
                    return
                objects[key] = entry
            self._note(kind, obj, deleted=event == "DELETED")
            self._cond.notify_all()
        self._on_change()

    @property
    def synced(self) -> bool:
        with self._cond:
            return self._synced == set(self._objects)

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

    def take(self) -> Snapshot:
        """Every object now, and the changes since the last take."""
        with self._cond:
            changes, self._changes = self._changes, Snapshot([])
            changes.documents = [o for objects in self._objects.values() for o in objects.values()]
        return changes


class Backoff:
    """Exponential backoff with jitter and a cap: 0.5 s, 1 s, 2 s, ... at most ``cap``."""

    def __init__(self, initial: float = 0.5, cap: float = 30.0) -> None:
        self.initial, self.cap, self.failures = initial, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.initial * 2 ** min(self.failures, 32))
        self.failures += 1
        return float(delay * random.uniform(0.8, 1.2))

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


def list_pages(call: Callable[..., Any]) -> tuple[list[dict[str, Any]], str]:
    """Every item of a list, a page at a time (``limit`` and ``continue``, as client-go's
    pager), and the list's resourceVersion. An expired continue token (410) raises
    ``ApiException``; the caller lists again."""
    import json

    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        paging: dict[str, Any] = {"limit": LIST_PAGE}
        if token:
            paging["_continue"] = token
        response = call(_preload_content=False, _request_timeout=60, **paging)
        body = json.loads(response.data)
        items.extend(i for i in body.get("items") or [] if isinstance(i, dict))
        metadata = body.get("metadata") or {}
        token = metadata.get("continue")
        if not token:
            return items, str(metadata.get("resourceVersion") or "")


class Informer(threading.Thread):
    """List, then watch from the list's resourceVersion, for one kind, into the store: relist
    on 410 Gone, resume a dropped stream from the last version seen, back off on errors."""

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
        self.backoff = Backoff()

    def run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        while not self.stop.is_set():
            try:
                version = self._list()
                self._watch(version)
            except Gone:
                log.info("%s: resourceVersion expired (410 Gone): listing again", self.kind)
            except ApiException as error:
                if error.status == 410:  # a list's continue token expired
                    log.info("%s: list expired (410 Gone): listing again", self.kind)
                    continue
                self._pause(f"{error.status} {error.reason}")
            except Exception as error:  # a dropped connection, a bad answer: retry later
                self._pause(f"{type(error).__name__}: {error}")

    def _pause(self, why: str) -> None:
        delay = self.backoff.next()
        log.warning("%s: list/watch failed (%s); retrying in %.1fs", self.kind, why, delay)
        self.stop.wait(delay)

    def _list(self) -> str:
        items, version = list_pages(self.call)
        self.store.replace(self.kind, items)
        self.backoff.reset()
        log.debug("%s: listed %d at resourceVersion %s", self.kind, len(items), version)
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
            try:
                for event in stream:
                    version = self._event(event) or version
                    if self.stop.is_set():
                        return
            except ApiException as error:
                if error.status == 410:
                    raise Gone() from None
                self._pause(f"watch: {error.status} {error.reason}")
            except Gone:
                raise
            except Exception as error:  # the stream dropped: resume where it stopped
                self._pause(f"watch dropped: {type(error).__name__}")
            else:
                self.backoff.reset()

    def _event(self, event: dict[str, Any]) -> str | None:
        kind, obj = event.get("type"), event.get("raw_object") or event.get("object")
        if not isinstance(obj, dict):
            return None
        self.backoff.reset()  # the stream works again, bookmarks included
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise RuntimeError(f"watch error: {obj.get('message')}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self.store.apply(self.kind, str(kind), obj)
        return str(version) if version else None


def api_lists(api: Any, node_name: str) -> dict[str, Callable[..., Any]]:
    """The list calls of kpgen run, by kind: Services (less those kube-proxy leaves alone),
    EndpointSlices, and this node."""
    from kubernetes import client

    core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)

    def services(**kwargs: Any) -> Any:
        return core.list_service_for_all_namespaces(label_selector=SERVICE_SELECTOR, **kwargs)

    def slices(**kwargs: Any) -> Any:
        return discovery.list_endpoint_slice_for_all_namespaces(**kwargs)

    def node(**kwargs: Any) -> Any:
        return core.list_node(field_selector=f"metadata.name={node_name}", **kwargs)

    return {SERVICE: services, SLICE: slices, NODE: node}


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
