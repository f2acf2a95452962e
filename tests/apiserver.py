"""A Kubernetes API server for tests that speaks the real list/watch protocol.

The controller's tests run the real ``kubernetes`` client against this server, over HTTP on
127.0.0.1, instead of mocking the client: the protocol (resourceVersions, watch streams, 410
Gone, bookmarks, paging) is what they have to prove. It serves Services (v1), EndpointSlices
(discovery.k8s.io/v1), Nodes (v1) and Events (v1 and events.k8s.io/v1), keeps one global
resourceVersion (etcd's revision) and a bounded event history, and lets a test change the
state (``create``, ``update``, ``patch``, ``delete``, ``set_objects``) and inject faults
(``compact``, ``drop_watches``, ``fail_next``, ``slow``; ``stop`` and ``start`` again keep the
state, as a restarted server). Standard library only (``http.server``).

Why not kmock (PyPI ``kmock``, the Kubernetes API emulator by kopf's author): the parts of the
protocol these tests are about are the parts it does not have. Its lists carry resourceVersion
``'...'``, its watches ignore ``resourceVersion`` and replay every object as ADDED, and it has
no event history, hence no 410 Gone, no bookmarks and no paging. Its store is a per-resource
asyncio bus with no revisions, so extending it would have meant replacing its storage, list
and watch handlers, i.e. all of what we use, on top of an aiohttp/attrs/yarl/jsonpatch stack
whose API its author calls unstable before v1. A focused server on ``http.server`` is about
as long as the adapter would have been, adds no dependency, and does exactly what the real
server does where our controller depends on it.

Behaviour, as the real kube-apiserver (etcd3 storage and watch cache):

- Every change (create, update, patch, delete, of any kind) takes the next resourceVersion;
  an object carries that of its last change; a DELETED event's object carries the deletion's.
  An update that changes nothing changes nothing (no new resourceVersion, no event).
- LIST follows the API's resourceVersion table: unset is the latest state; ``0`` any (here: the
  latest); ``X`` "not older than X" (the latest; 504 "Too large resource version" when X is in
  the future, after waiting ``too_large_wait`` s), except with ``limit`` set or
  ``resourceVersionMatch=Exact``, where it is the state exactly at X (rebuilt from the history;
  410 Expired when X is older than the history). ``limit`` pages and ``continue`` returns the
  next page of that same snapshot; an expired continue token is a 410 with a fresh token.
  Items are sorted by namespace and name (etcd's key order) and have no kind/apiVersion.
- WATCH from ``X`` sends every event after X, in order, then live ones; ``""`` or ``0`` starts
  with ADDED for the current objects. X older than the history: HTTP 200 then one ERROR event
  with a 410 Expired Status ("too old resource version"). With selectors, an object that
  starts or stops matching is ADDED or DELETED, as in the watch cache. BOOKMARKs every
  ``bookmark_interval`` s with ``allowWatchBookmarks=true``; ``timeoutSeconds`` ends the stream
  cleanly; ``sendInitialEvents=true`` ends the initial ADDED events with the
  ``k8s.io/initial-events-end`` bookmark. A watch from a future X waits for it.
- Selectors: labelSelector with ``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``, ``k in (..)``,
  ``k notin (..)``; fieldSelector with ``metadata.name`` and ``metadata.namespace``.

Not modelled: authentication, admission, defaulting and validation of specs (ClusterIP
allocation, ...), finalizers (delete is immediate), status subresources, strategic merge patch
(treated as a JSON merge patch, which differs for lists with merge keys), protobuf, server-side
apply.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import json
import re
import secrets
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, urlsplit

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace or "", name)
_T = TypeVar("_T")

ADDED, MODIFIED, DELETED, BOOKMARK, ERROR = "ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"
INITIAL_EVENTS_END = "k8s.io/initial-events-end"


@dataclass(frozen=True)
class Resource:
    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:  # "services", "endpointslices.discovery.k8s.io", as in messages
        return f"{self.plural}.{self.group}" if self.group else self.plural


SERVICES = Resource("Service", "", "v1", "services", True, ("svc",))
ENDPOINT_SLICES = Resource("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices", True)
NODES = Resource("Node", "", "v1", "nodes", False, ("no",))
EVENTS = Resource("Event", "", "v1", "events", True, ("ev",))
EVENTS_V1 = Resource("Event", "events.k8s.io", "v1", "events", True, ("ev",))
RESOURCES = (SERVICES, ENDPOINT_SLICES, NODES, EVENTS, EVENTS_V1)
CLUSTER_STATE_KINDS = ("Service", "EndpointSlice", "Node")  # what set_objects replaces


def resource_for(kind: str, api_version: str | None = None) -> Resource:
    """The resource of a kind ("Event" alone is the core v1 one)."""
    for res in RESOURCES:
        if res.kind == kind and (api_version is None or res.api_version == api_version):
            return res
    raise ValueError(f"unknown kind {kind!r} (apiVersion {api_version!r})")


# ---------------------------------------------------------------------------------------------
# Errors: a Status, as the real server sends them


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """A failed request: raised by the Python API, sent over HTTP as a Status."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        *,
        details: Obj | None = None,
        metadata: Obj | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "")
        self.details = details
        self.metadata = metadata or {}

    def status(self) -> Obj:
        status: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": self.metadata,
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            status["details"] = self.details
        return status


def _not_found(res: Resource, name: str) -> ApiError:
    return ApiError(
        404,
        f'{res.qualified} "{name}" not found',
        details={"name": name, "group": res.group, "kind": res.plural},
    )


def _expired(message: str, metadata: Obj | None = None) -> ApiError:
    return ApiError(410, message, "Expired", metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Selectors


_LABEL_REQUIREMENT = re.compile(
    r"""\s*(?:
        !\s*(?P<absent>[^\s,=!()]+)
      | (?P<key>[^\s,=!()]+)
        (?: \s*(?P<op>==|=|!=)\s*(?P<value>[^\s,=!()]*)
          | \s+(?P<setop>in|notin)\s*\((?P<values>[^()]*)\)
        )?
    )\s*(?:,|$)""",
    re.VERBOSE,
)
_FIELD_REQUIREMENT = re.compile(
    r"^\s*(?P<field>[^\s=!]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^,]*?)\s*$"
)
FIELDS = ("metadata.name", "metadata.namespace")

LabelRequirement = tuple[str, str, frozenset[str]]  # key, op (exists/!/in/notin), values


def parse_label_selector(text: str) -> tuple[LabelRequirement, ...]:
    requirements: list[LabelRequirement] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _LABEL_REQUIREMENT.match(text, pos)
        if not m or m.end() == pos:
            raise ApiError(400, f"unable to parse requirement: {text[pos:]!r}")
        pos = m.end()
        if m["absent"]:
            requirements.append((m["absent"], "!", frozenset()))
        elif m["op"]:
            op = "notin" if m["op"] == "!=" else "in"
            requirements.append((m["key"], op, frozenset([m["value"]])))
        elif m["setop"]:
            values = frozenset(v.strip() for v in m["values"].split(",") if v.strip())
            requirements.append((m["key"], m["setop"], values))
        else:
            requirements.append((m["key"], "exists", frozenset()))
    return tuple(requirements)


def parse_field_selector(text: str) -> tuple[tuple[str, bool, str], ...]:
    requirements: list[tuple[str, bool, str]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _FIELD_REQUIREMENT.match(part)
        if not m:
            raise ApiError(400, f"invalid selector: {part!r}; can't understand {part!r}")
        if m["field"] not in FIELDS:
            raise ApiError(400, f"field label not supported: {m['field']}")
        requirements.append((m["field"], m["op"] != "!=", m["value"]))
    return tuple(requirements)


@dataclass(frozen=True)
class Selector:
    """What a list or watch asks for: namespace (from the path), labels and fields."""

    namespace: str | None = None
    labels: tuple[LabelRequirement, ...] = ()
    fields: tuple[tuple[str, bool, str], ...] = ()

    @classmethod
    def parse(
        cls, namespace: str | None = None, label_selector: str = "", field_selector: str = ""
    ) -> Selector:
        return cls(
            namespace, parse_label_selector(label_selector), parse_field_selector(field_selector)
        )

    @property
    def filters(self) -> bool:  # remainingItemCount is only given without label/field selectors
        return bool(self.labels or self.fields)

    def matches(self, obj: Obj) -> bool:
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        for name, equal, value in self.fields:
            actual = meta.get("name" if name == "metadata.name" else "namespace", "")
            if (actual == value) != equal:
                return False
        if self.labels:
            labels = meta.get("labels") or {}
            for key, op, values in self.labels:
                present = key in labels
                if op == "exists" and not present:
                    return False
                if op == "!" and present:
                    return False
                if op == "in" and not (present and labels[key] in values):
                    return False
                if op == "notin" and present and labels[key] in values:
                    return False
        return True


# ---------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True)
class _Event:
    rv: int
    resource: Resource
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj  # the new state; for DELETED the last state with the deletion's resourceVersion
    old: Obj | None  # the state before (None for ADDED)


@dataclass(eq=False)
class _Watch:
    resource: Resource
    path: str
    after: int  # events with a resourceVersion above this one go to the queue
    conn: socket.socket
    queue: list[_Event] = field(default_factory=list)
    stop: str | None = None  # "abrupt" or "graceful"
    bookmark_now: bool = False


@dataclass
class Request:
    """One request as the server saw it; ``status`` is the HTTP status it got (200 for watches,
    also when the stream then carries an ERROR event)."""

    method: str
    path: str
    query: dict[str, str]
    body: Any = None
    status: int | None = None
    authorization: str | None = None  # the Authorization header, as sent

    @property
    def watch(self) -> bool:
        return self.query.get("watch", "").lower() in ("true", "1")


def _copy(obj: _T) -> _T:
    """A deep copy of JSON data (and a check that it is JSON), faster than copy.deepcopy."""
    return cast(_T, json.loads(json.dumps(obj)))


def _key(obj: Obj) -> Key:
    meta = obj["metadata"]
    return (meta.get("namespace") or "", meta["name"])


def _object_key(res: Resource, namespace: str | None, name: str) -> Key:
    return ((namespace or "") if res.namespaced else "", name)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _with_rv(obj: Obj, rv: int) -> Obj:
    return {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(rv)}}


def _list_item(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k != "kind" and k != "apiVersion"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used, approximately, for strategic merge patches)."""
    if not isinstance(patch, dict):
        return _copy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def json_patch(target: Obj, operations: list[Obj]) -> Obj:
    """RFC 6902 JSON patch: add, remove, replace, test."""
    doc = _copy(target)
    for op in operations:
        path = op.get("path", "")
        parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
        if not parts:
            raise ApiError(422, f"unsupported JSON patch path {path!r}")
        parent: Any = doc
        try:
            for part in parts[:-1]:
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            last = parts[-1]
            kind = op.get("op")
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(index, op["value"])
                elif kind == "remove":
                    del parent[index]
                elif kind == "replace":
                    parent[index] = op["value"]
                elif kind == "test":
                    if parent[index] != op["value"]:
                        raise ApiError(422, f"test failed at {path}")
                else:
                    raise ApiError(422, f"unsupported JSON patch op {kind!r}")
            elif kind in ("add", "replace"):
                if kind == "replace" and last not in parent:
                    raise ApiError(422, f"replace of missing {path}")
                parent[last] = op["value"]
            elif kind == "remove":
                del parent[last]
            elif kind == "test":
                if parent.get(last) != op["value"]:
                    raise ApiError(422, f"test failed at {path}")
            else:
                raise ApiError(422, f"unsupported JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ApiError(422, f"JSON patch {op!r} failed: {exc!r}") from None
    return doc


class ApiServer:
    """The server and its state. Thread-safe; all state changes go through one condition
    variable, which also wakes the watch streams.

    ``history_limit``: at least this many events are kept (watching or listing exactly from
    older resourceVersions is 410 Gone). ``bookmark_interval``: seconds between BOOKMARKs.
    ``too_large_wait``: how long a list "not older than" a future resourceVersion waits before
    the 504. ``watch_timeout``: end watches without timeoutSeconds after this long (the real
    server uses 30-60 minutes; None: never).
    """

    def __init__(
        self,
        *,
        history_limit: int = 100_000,
        bookmark_interval: float = 1.0,
        too_large_wait: float = 3.0,
        watch_timeout: float | None = None,
        initial_resource_version: int = 1,
    ) -> None:
        self.history_limit = history_limit
        self.bookmark_interval = bookmark_interval
        self.too_large_wait = too_large_wait
        self.watch_timeout = watch_timeout
        self.errors: list[str] = []  # tracebacks of the server's own failures (a test bug)
        self._cond = threading.Condition()
        self._objects: dict[Resource, dict[Key, Obj]] = {res: {} for res in RESOURCES}
        self._created: dict[tuple[Resource, Key], int] = {}  # creation order, for events()
        self._rv = initial_resource_version
        self._compacted = initial_resource_version  # the history holds every event after this
        self._log: list[_Event] = []  # _log[i].rv == _compacted + 1 + i
        self._watches: set[_Watch] = set()
        self._connections: set[socket.socket] = set()
        self._requests: list[Request] = []
        self._fail_count = 0
        self._fail_status = 500
        self._fail_path: str | None = None
        self.response_delay = 0.0  # seconds every request waits before its answer (slow())
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, listener: socket.socket | None = None) -> ApiServer:
        """Serve on 127.0.0.1 on a free port, or on ``listener``, a listening socket made
        elsewhere (in another network namespace, say: a socket stays in the namespace it was
        made in)."""
        if self._httpd is not None:
            return self
        if listener is None:
            self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        else:
            self._httpd = _HTTPServer(listener.getsockname(), _Handler, bind_and_activate=False)
            self._httpd.socket.close()
            self._httpd.socket = listener
        self._httpd.api = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"apiserver:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        self.drop_watches()
        with self._cond:
            connections = list(self._connections)
        for conn in connections:  # idle keep-alive connections
            _shutdown(conn)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the API server is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the API server is not started")
        host, port = self._httpd.socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self, path: str | Path, token: str | None = None) -> Path:
        """Write a kubeconfig for this server and return its path: no authentication, or a
        bearer ``token`` (which the server records, not checks)."""
        user = {"token": token} if token else {}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kpgen-test", "cluster": {"server": self.url}}],
            "users": [{"name": "kpgen-test", "user": user}],
            "contexts": [
                {"name": "kpgen-test", "context": {"cluster": "kpgen-test", "user": "kpgen-test"}}
            ],
            "current-context": "kpgen-test",
        }
        path = Path(path)
        path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        return path

    # -- state: the Python API ---------------------------------------------------------------

    @property
    def current_resource_version(self) -> int:
        with self._cond:
            return self._rv

    def create(self, obj: Obj) -> Obj:
        """Store a new object (kind and apiVersion say which resource); returns what is stored:
        with uid, creationTimestamp, resourceVersion, and namespace "default" if it had none."""
        return _copy(self._create(self._resource_of(obj), obj))

    def update(self, obj: Obj) -> Obj:
        """Replace an object whole (uid and creationTimestamp are kept). With a
        metadata.resourceVersion that is not the stored one: 409 Conflict."""
        return _copy(self._update(self._resource_of(obj), obj))

    def patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Obj,
        *,
        api_version: str | None = None,
    ) -> Obj:
        """Apply a JSON merge patch (None deletes a key)."""
        res = resource_for(kind, api_version)
        return _copy(self._patch(res, namespace, name, lambda old: merge_patch(old, patch)))

    def delete(
        self, kind: str, namespace: str | None, name: str, *, api_version: str | None = None
    ) -> Obj:
        """Delete an object; returns its last state (with the deletion's resourceVersion)."""
        return _copy(self._delete(resource_for(kind, api_version), namespace, name))

    def get(
        self, kind: str, namespace: str | None, name: str, *, api_version: str | None = None
    ) -> Obj | None:
        res = resource_for(kind, api_version)
        with self._cond:
            obj = self._objects[res].get(_object_key(res, namespace, name))
        return None if obj is None else _copy(obj)

    def objects(
        self, kind: str, namespace: str | None = None, *, api_version: str | None = None
    ) -> list[Obj]:
        """The stored objects of a kind (in one namespace, or all), sorted by namespace, name."""
        res = resource_for(kind, api_version)
        with self._cond:
            objs = dict(self._objects[res])
        return [
            _copy(objs[key]) for key in sorted(objs) if namespace is None or key[0] == namespace
        ]

    def set_objects(
        self, objects: Iterable[Obj], *, kinds: Iterable[str] = CLUSTER_STATE_KINDS
    ) -> int:
        """Make the stored objects of ``kinds`` exactly ``objects``: create what is new, update
        what differs, delete the rest, each a normal change with its event. Returns the
        resourceVersion after."""
        chosen = {res for res in RESOURCES if res.kind in set(kinds)}
        desired: dict[tuple[Resource, Key], Obj] = {}
        for obj in objects:
            res = self._resource_of(obj)
            if res not in chosen:
                raise ValueError(f"{res.kind} is not among the kinds to set: {sorted(kinds)}")
            obj = _copy(obj)
            meta = obj.setdefault("metadata", {})
            meta.pop("resourceVersion", None)
            if res.namespaced:
                meta.setdefault("namespace", "default")
            desired[(res, _key(obj))] = obj
        with self._cond:
            for (res, key), obj in desired.items():
                if key in self._objects[res]:
                    self._update(res, obj)
                else:
                    self._create(res, obj)
            for res in sorted(chosen, key=lambda r: (r.group, r.plural)):
                for key in sorted(self._objects[res]):
                    if (res, key) not in desired:
                        self._delete(res, key[0], key[1])
            return self._rv

    def events(self, *, api_version: str | None = None) -> list[Obj]:
        """The stored Events (v1 and events.k8s.io/v1, or one of them), in creation order."""
        with self._cond:
            found = [
                (self._created[(res, key)], obj)
                for res in (EVENTS, EVENTS_V1)
                if api_version is None or res.api_version == api_version
                for key, obj in self._objects[res].items()
            ]
        return [_copy(obj) for _, obj in sorted(found, key=lambda x: x[0])]

    # -- faults and observation --------------------------------------------------------------

    def compact(self, resource_version: int | None = None) -> None:
        """Forget the history up to ``resource_version`` (default: all of it), as an etcd
        compaction: watches and exact lists from older versions get 410 Gone. Open watches go
        on unharmed, as on a real server."""
        with self._cond:
            target = self._rv if resource_version is None else resource_version
            if not self._compacted <= target <= self._rv:
                raise ValueError(
                    f"cannot compact to {target}: kept are {self._compacted}..{self._rv}"
                )
            del self._log[: target - self._compacted]
            self._compacted = target

    def drop_watches(self, *, graceful: bool = False) -> int:
        """End every open watch stream, and return how many there were. Abruptly (default): the
        connection is shut down mid-stream, without the final chunk, and the client's read
        fails (urllib3 ProtocolError), as when an apiserver or load balancer dies. Graceful:
        the stream ends cleanly, as at timeoutSeconds. Returns when they have ended."""
        with self._cond:
            watches = list(self._watches)
            for w in watches:
                w.stop = "graceful" if graceful else "abrupt"
            self._cond.notify_all()
        if not graceful:
            for w in watches:
                _shutdown(w.conn)
        with self._cond:
            self._cond.wait_for(lambda: not (self._watches & set(watches)), timeout=5)
        return len(watches)

    def send_bookmarks(self) -> None:
        """Send a BOOKMARK now on every open watch that allows them."""
        with self._cond:
            for w in self._watches:
                w.bookmark_now = True
            self._cond.notify_all()

    def fail_next(self, n: int = 1, status: int = 500, *, path: str | None = None) -> None:
        """The next ``n`` requests (only those whose path starts with ``path``, if given) are
        answered with an error Status of this HTTP status, and change nothing."""
        with self._cond:
            self._fail_count, self._fail_status, self._fail_path = n, status, path

    def slow(self, seconds: float) -> None:
        """Every request from now on waits ``seconds`` before it is answered (a watch: before
        its response starts), as an overloaded server; 0 ends it."""
        self.response_delay = seconds

    @property
    def requests(self) -> list[Request]:
        """Every request so far, in arrival order (a copy of the list)."""
        with self._cond:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._cond:
            self._requests.clear()

    def open_watches(self, path: str | None = None) -> int:
        """How many watch streams are open (on exactly this path, if given)."""
        with self._cond:
            return sum(1 for w in self._watches if path is None or w.path == path)

    def wait_for_watches(
        self, count: int = 1, *, path: str | None = None, timeout: float = 5
    ) -> None:
        """Wait until at least ``count`` watches are open (on ``path``); AssertionError if not."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: sum(1 for w in self._watches if path is None or w.path == path) >= count,
                timeout,
            )
        assert ok, f"{count} watches on {path or 'any path'} not open after {timeout}s"

    def wait_for_request(
        self, predicate: Callable[[Request], bool], *, timeout: float = 5
    ) -> Request:
        """Wait until a request that satisfies ``predicate`` has arrived; return the first."""
        with self._cond:
            found: list[Request] = []

            def arrived() -> bool:
                found[:] = [r for r in self._requests if predicate(r)][:1]
                return bool(found)

            ok = self._cond.wait_for(arrived, timeout)
        assert ok, f"no such request after {timeout}s"
        return found[0]

    # -- state: internals (callers outside hold no lock; the condition is reentrant) ----------

    def _resource_of(self, obj: Obj) -> Resource:
        if not isinstance(obj, dict) or "kind" not in obj:
            raise ValueError("an object needs a kind (and, for events.k8s.io, an apiVersion)")
        return resource_for(obj["kind"], obj.get("apiVersion"))

    def _normalize(self, res: Resource, body: Any, namespace: str | None, name: str | None) -> Obj:
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise ApiError(400, "the body is not a Kubernetes object")
        obj: Obj = _copy(body)
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            if namespace and meta.get("namespace") and meta["namespace"] != namespace:
                raise ApiError(
                    400,
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request",
                )
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if name is not None:
            if meta.get("name", name) != name:
                raise ApiError(400, "the name of the object does not match the name on the URL")
            meta["name"] = name
        return obj

    def _create(self, res: Resource, obj: Any, namespace: str | None = None) -> Obj:
        obj = self._normalize(res, obj, namespace, None)
        meta = obj["metadata"]
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(
                    422, "metadata.name: Required value: name or generateName is required"
                )
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        for k in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(k, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        key = _key(obj)
        with self._cond:
            if key in self._objects[res]:
                raise ApiError(
                    409,
                    f'{res.qualified} "{meta["name"]}" already exists',
                    "AlreadyExists",
                    details={"name": meta["name"], "group": res.group, "kind": res.plural},
                )
            stored = self._commit(res, ADDED, obj, None)
            self._created[(res, key)] = self._rv
            return stored

    def _update(
        self, res: Resource, obj: Any, namespace: str | None = None, name: str | None = None
    ) -> Obj:
        obj = self._normalize(res, obj, namespace, name)
        with self._cond:
            old = self._objects[res].get(_key(obj))
            if old is None:
                raise _not_found(res, obj["metadata"].get("name", ""))
            return self._replace(res, old, obj)

    def _patch(
        self, res: Resource, namespace: str | None, name: str, apply: Callable[[Obj], Any]
    ) -> Obj:
        with self._cond:
            old = self._objects[res].get(_object_key(res, namespace, name))
            if old is None:
                raise _not_found(res, name)
            new = self._normalize(res, apply(old), old["metadata"].get("namespace"), name)
            return self._replace(res, old, new)

    def _replace(self, res: Resource, old: Obj, new: Obj) -> Obj:
        meta, old_meta = new["metadata"], old["metadata"]
        wanted = meta.get("resourceVersion")
        if wanted and wanted != old_meta["resourceVersion"]:
            raise ApiError(
                409,
                f'Operation cannot be fulfilled on {res.qualified} "{old_meta["name"]}": the '
                "object has been modified; please apply your changes to the latest version and "
                "try again",
                details={"name": old_meta["name"], "group": res.group, "kind": res.plural},
            )
        for k in ("uid", "creationTimestamp", "resourceVersion"):
            meta[k] = old_meta[k]
        if new == old:
            return old  # a no-op update writes nothing
        return self._commit(res, MODIFIED, new, old)

    def _delete(self, res: Resource, namespace: str | None, name: str) -> Obj:
        with self._cond:
            old = self._objects[res].get(_object_key(res, namespace, name))
            if old is None:
                raise _not_found(res, name)
            self._created.pop((res, _key(old)), None)
            return self._commit(res, DELETED, old, old)

    def _commit(self, res: Resource, type_: str, obj: Obj, old: Obj | None) -> Obj:
        with self._cond:
            self._rv += 1
            obj = _with_rv(obj, self._rv)
            if type_ == DELETED:
                del self._objects[res][_key(obj)]
            else:
                self._objects[res][_key(obj)] = obj
            event = _Event(self._rv, res, type_, obj, old)
            self._log.append(event)
            excess = len(self._log) - self.history_limit
            if excess > max(16, self.history_limit // 8):  # trim in batches
                del self._log[:excess]
                self._compacted += excess
            for w in self._watches:
                if w.resource is res and event.rv > w.after:
                    w.queue.append(event)
            self._cond.notify_all()
            return obj

    def _state_at(self, res: Resource, rv: int) -> dict[Key, Obj]:
        """The objects of a resource as they were at ``rv`` (caller holds the lock and checked
        that ``_compacted <= rv <= _rv``)."""
        objs = dict(self._objects[res])
        for event in reversed(self._log[rv - self._compacted :]):
            if event.resource is not res:
                continue
            if event.type == ADDED:
                del objs[_key(event.obj)]
            else:
                assert event.old is not None
                objs[_key(event.old)] = event.old
        return objs

    def _wait_for_rv(self, rv: int) -> None:
        """Wait (holding the lock) until ``rv`` exists; 504 "Too large resource version"."""
        if not self._cond.wait_for(lambda: self._rv >= rv, self.too_large_wait):
            raise ApiError(
                504,
                f"Too large resource version: {rv}, current: {self._rv}",
                "Timeout",
                details={
                    "causes": [
                        {
                            "reason": "ResourceVersionTooLarge",
                            "message": "Too large resource version",
                        }
                    ],
                    "retryAfterSeconds": 1,
                },
            )

    # -- HTTP: list --------------------------------------------------------------------------

    def _list(self, res: Resource, sel: Selector, query: dict[str, str]) -> Obj:
        rv_param = query.get("resourceVersion", "")
        match = query.get("resourceVersionMatch", "")
        cont = query.get("continue", "")
        try:
            limit = int(query.get("limit") or 0)
        except ValueError:
            raise ApiError(400, f"invalid limit {query['limit']!r}") from None
        start_after: Key | None = None
        exact: int | None = None  # serve the state exactly at this resourceVersion
        not_older_than = 0
        if cont:
            if rv_param not in ("", "0") or match:
                raise ApiError(
                    400, "specifying resource version is not allowed when using continue"
                )
            exact, start_after = _decode_continue(cont, res)
        elif match == "Exact":
            if rv_param in ("", "0"):
                raise ApiError(
                    400, "resourceVersionMatch=Exact needs a resourceVersion other than 0"
                )
            exact = _parse_rv(rv_param)
        elif match == "NotOlderThan":
            if rv_param == "":
                raise ApiError(400, "resourceVersionMatch=NotOlderThan needs a resourceVersion")
            not_older_than = _parse_rv(rv_param)
        elif match:
            raise ApiError(400, f"unknown resourceVersionMatch {match!r}")
        elif rv_param not in ("", "0"):
            if limit > 0:
                exact = _parse_rv(rv_param)  # paged from etcd, at that revision
            else:
                not_older_than = _parse_rv(rv_param)  # from the watch cache
        with self._cond:
            if exact is not None:
                self._wait_for_rv(exact)
                if exact < self._compacted:
                    if cont:
                        fresh = _encode_continue(self._rv, start_after, res)
                        raise _expired(
                            "The provided continue parameter is too old to display a consistent "
                            "list result. You can start a new list without the continue "
                            "parameter, or use the continue token in this response to retrieve "
                            "the remainder of the results. Continuing with the provided token "
                            "results in an inconsistent list - objects that were created, "
                            "modified, or deleted between the time the first chunk was returned "
                            "and now may show up in the list.",
                            {"continue": fresh},
                        )
                    raise _expired("The resourceVersion for the provided list is too old.")
                list_rv = exact
                objs = self._state_at(res, exact)
            else:
                if not_older_than:
                    self._wait_for_rv(not_older_than)
                list_rv = self._rv
                objs = dict(self._objects[res])
        # stored objects are never changed in place: no lock needed from here
        keys = sorted(k for k, obj in objs.items() if sel.matches(obj))
        if start_after is not None:
            keys = keys[bisect.bisect_right(keys, start_after) :]
        meta: Obj = {"resourceVersion": str(list_rv)}
        if 0 < limit < len(keys):
            meta["continue"] = _encode_continue(list_rv, keys[limit - 1], res)
            if not sel.filters:
                meta["remainingItemCount"] = len(keys) - limit
            keys = keys[:limit]
        return {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version,
            "metadata": meta,
            "items": [_list_item(objs[k]) for k in keys],
        }


def _parse_rv(text: str) -> int:
    try:
        rv = int(text)
    except ValueError:
        rv = -1
    if rv < 0:
        raise ApiError(400, f"Invalid value: {text!r}: resourceVersion must be a number")
    return rv


def _encode_continue(rv: int, key: Key | None, res: Resource) -> str:
    raw = json.dumps({"v": "kpgen.test/1", "rv": rv, "start": key, "r": res.qualified})
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_continue(token: str, res: Resource) -> tuple[int, Key | None]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        if data["v"] != "kpgen.test/1" or data["r"] != res.qualified:
            raise ValueError(data)
        start = data["start"]
        return int(data["rv"]), (None if start is None else (str(start[0]), str(start[1])))
    except (ValueError, KeyError, TypeError, IndexError, binascii.Error):
        raise ApiError(400, f"continue key is not valid: {token!r}") from None


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------------------------
# HTTP


_RESOURCE_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?/?$"
)
_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def _version_info() -> Obj:
    return {
        "major": "1",
        "minor": "31",
        "gitVersion": "v1.31.0-kpgen-test",
        "gitCommit": "0" * 40,
        "gitTreeState": "clean",
        "buildDate": "2024-08-13T00:00:00Z",
        "goVersion": "go1.22.5",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def _group_doc(group: str) -> Obj:
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": [{"groupVersion": f"{group}/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": f"{group}/v1", "version": "v1"},
    }


def _discovery(path: str) -> Obj | None:
    groups = sorted({res.group for res in RESOURCES if res.group})
    if path == "/version":
        return _version_info()
    if path == "/api":
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}
            ],
        }
    if path == "/apis":
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [_group_doc(g) for g in groups],
        }
    if path.startswith("/apis/") and path[6:] in groups:
        return _group_doc(path[6:])
    if path == "/":
        return {
            "paths": ["/api", "/api/v1", "/apis", "/version", "/healthz", "/livez", "/readyz"]
            + [f"/apis/{g}" for g in groups]
            + [f"/apis/{g}/v1" for g in groups]
        }
    for group_version in ["v1"] + [f"{g}/v1" for g in groups]:
        prefix = "/api/" if group_version == "v1" else "/apis/"
        if path == prefix + group_version:
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": group_version,
                "resources": [
                    {
                        "name": res.plural,
                        "singularName": res.kind.lower(),
                        "namespaced": res.namespaced,
                        "kind": res.kind,
                        "verbs": _VERBS,
                        "shortNames": list(res.short_names),
                    }
                    for res in RESOURCES
                    if res.api_version == group_version
                ],
            }
    return None


def _route(path: str) -> tuple[Resource, str | None, str | None]:
    m = _RESOURCE_PATH.match(path)
    if m:
        group, version = ("", "v1") if m["core"] else (m["group"], m["version"])
        for res in RESOURCES:
            if (res.group, res.version, res.plural) == (group, version, m["plural"]):
                if m["ns"] is not None and not res.namespaced:
                    break
                if m["name"] is not None and res.namespaced and m["ns"] is None:
                    break
                return res, m["ns"], m["name"]
    raise ApiError(404, "the server could not find the requested resource")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    api: ApiServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away, or a test dropped the connection
        self.api.errors.append(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # headers and body are separate writes: without this, Nagle's algorithm and the
        # client's delayed ACK add 40 ms to every response
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.api._cond:
            self.server.api._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            with self.server.api._cond:
                self.server.api._connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing ----------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        api = self.server.api
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        authorization = self.headers.get("Authorization")
        self.request_record = Request(method, split.path, query, body, None, authorization)
        with api._cond:
            api._requests.append(self.request_record)
            fail = api._fail_count > 0 and (
                api._fail_path is None or split.path.startswith(api._fail_path)
            )
            if fail:
                api._fail_count -= 1
            api._cond.notify_all()
        if api.response_delay > 0:
            time.sleep(api.response_delay)
        try:
            if fail:
                code = api._fail_status
                raise ApiError(code, f"injected failure ({code})")
            self._handle(method, split.path.rstrip("/") or "/", query, body)
        except ApiError as exc:
            self._send_json(exc.code, exc.status())
        except OSError:
            self.close_connection = True
        except Exception:
            api.errors.append(traceback.format_exc())
            self._send_json(500, ApiError(500, "internal error of the test API server").status())

    def _send_json(self, code: int, obj: Any, content_type: str = "application/json") -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
        self.request_record.status = code
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str, path: str, query: dict[str, str], body: Any) -> None:
        api = self.server.api
        if method == "GET" and path in ("/healthz", "/livez", "/readyz"):
            self._send_json(200, b"ok", "text/plain; charset=utf-8")
            return
        if method == "GET":
            doc = _discovery(path)
            if doc is not None:
                self._send_json(200, doc)
                return
        res, namespace, name = _route(path)
        if method == "GET" and name is None:
            sel = Selector.parse(
                namespace, query.get("labelSelector", ""), query.get("fieldSelector", "")
            )
            if query.get("watch", "").lower() in ("true", "1"):
                self._watch(res, sel, path, query)
            else:
                self._send_json(200, api._list(res, sel, query))
        elif method == "GET":
            assert name is not None
            with api._cond:
                obj = api._objects[res].get((namespace or "", name))
            if obj is None:
                raise _not_found(res, name)
            self._send_json(200, obj)
        elif method == "POST" and name is None:
            self._send_json(201, api._create(res, body, namespace))
        elif method == "PUT" and name is not None:
            self._send_json(200, api._update(res, body, namespace, name))
        elif method == "PATCH" and name is not None:
            self._send_json(200, api._patch(res, namespace, name, self._patcher(body)))
        elif method == "DELETE" and name is not None:
            deleted = api._delete(res, namespace, name)
            self._send_json(
                200,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {
                        "name": name,
                        "group": res.group,
                        "kind": res.plural,
                        "uid": deleted["metadata"]["uid"],
                    },
                },
            )
        else:
            raise ApiError(405, f"the server does not allow this method on {path}")

    def _patcher(self, body: Any) -> Callable[[Obj], Any]:
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type == "application/json-patch+json":
            if not isinstance(body, list):
                raise ApiError(400, "a JSON patch is a list of operations")
            return lambda old: json_patch(old, body)
        if content_type in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            if not isinstance(body, dict):
                raise ApiError(400, "a merge patch is an object")
            return lambda old: merge_patch(old, body)
        raise ApiError(415, f"the body of the request was in an unknown format: {content_type}")

    # -- watch -------------------------------------------------------------------------------

    def _watch(self, res: Resource, sel: Selector, path: str, query: dict[str, str]) -> None:
        api = self.server.api
        rv_param = query.get("resourceVersion", "")
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        send_initial = query.get("sendInitialEvents", "").lower() in ("true", "1")
        timeout: float | None = api.watch_timeout
        if query.get("timeoutSeconds"):
            try:
                timeout = float(query["timeoutSeconds"])
            except ValueError:
                raise ApiError(400, "invalid timeoutSeconds") from None
        from_state = rv_param in ("", "0") or send_initial  # ADDED for what exists, then live
        after = 0 if from_state else _parse_rv(rv_param)
        snapshot: dict[Key, Obj] = {}
        backlog: list[_Event] = []
        too_old: str | None = None
        with api._cond:
            if from_state:
                snapshot = dict(api._objects[res])
                after = api._rv
            elif after < api._compacted:
                too_old = f"too old resource version: {after} ({api._compacted + 1})"
            else:
                backlog = [e for e in api._log[after - api._compacted :] if e.resource is res]
            watch = _Watch(res, path, after, self.connection)
            if too_old is None:
                api._watches.add(watch)
                api._cond.notify_all()
        try:
            self.request_record.status = 200
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache, private")
            self.end_headers()
            if too_old is not None:
                self._chunk([{"type": ERROR, "object": _expired(too_old).status()}])
                self._end_stream()
                return
            initial = [
                {"type": ADDED, "object": snapshot[k]}
                for k in sorted(snapshot)
                if sel.matches(snapshot[k])
            ]
            if send_initial:
                initial.append(self._bookmark(res, after, {INITIAL_EVENTS_END: "true"}))
            self._chunk(initial + _translate(backlog, sel))
            self._stream(watch, sel, bookmarks, timeout)
        finally:
            with api._cond:
                api._watches.discard(watch)
                api._cond.notify_all()

    def _stream(self, watch: _Watch, sel: Selector, bookmarks: bool, timeout: float | None) -> None:
        api = self.server.api
        now = time.monotonic()
        deadline = now + timeout if timeout else None
        next_bookmark = now + api.bookmark_interval
        while True:
            with api._cond:
                while not (watch.queue or watch.stop or watch.bookmark_now):
                    wake = [t for t in (deadline, next_bookmark if bookmarks else None) if t]
                    if wake and min(wake) <= time.monotonic():
                        break
                    api._cond.wait(min(wake) - time.monotonic() if wake else None)
                events, watch.queue = watch.queue, []
                rv, stop, bookmark_now = api._rv, watch.stop, watch.bookmark_now
                watch.bookmark_now = False
            if stop == "abrupt":
                self.close_connection = True
                _shutdown(self.connection)
                return
            lines = _translate(events, sel)
            now = time.monotonic()
            if bookmarks and (bookmark_now or now >= next_bookmark):
                lines.append(self._bookmark(watch.resource, rv))
                next_bookmark = now + api.bookmark_interval
            self._chunk(lines)
            if stop == "graceful" or (deadline is not None and now >= deadline):
                self._end_stream()
                return

    @staticmethod
    def _bookmark(res: Resource, rv: int, annotations: dict[str, str] | None = None) -> Obj:
        meta: Obj = {"resourceVersion": str(rv)}
        if annotations:
            meta["annotations"] = annotations
        return {
            "type": BOOKMARK,
            "object": {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta},
        }

    def _chunk(self, events: list[Obj]) -> None:
        if not events:
            return
        data = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events).encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")


def _translate(events: list[_Event], sel: Selector) -> list[Obj]:
    """Events as a watcher with this selector sees them (the watch cache's rules)."""
    out: list[Obj] = []
    for e in events:
        new_matches = e.type != DELETED and sel.matches(e.obj)
        old_matches = e.old is not None and sel.matches(e.old)
        if new_matches:
            out.append({"type": MODIFIED if old_matches else ADDED, "object": e.obj})
        elif old_matches:
            assert e.old is not None
            out.append({"type": DELETED, "object": _with_rv(e.old, e.rv)})
    return out


__all__ = [
    "CLUSTER_STATE_KINDS",
    "RESOURCES",
    "ApiError",
    "ApiServer",
    "Request",
    "Resource",
    "Selector",
    "json_patch",
    "merge_patch",
    "resource_for",
]
