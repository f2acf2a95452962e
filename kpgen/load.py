"""Reading manifests: files, directories and standard input, YAML or JSON, into API objects.

This module only reads and decodes; what the objects mean is :mod:`kpgen.parse`'s business.
List kinds are unwrapped, both ``kind: List`` (what ``kubectl get -o yaml`` prints) and the
API's own ``ServiceList``/``EndpointSliceList``, whose items carry no kind of their own.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


class InputError(Exception):
    """Input that cannot be read at all: a missing file, bad YAML or JSON."""


def _decode(text: str, source: str) -> Iterator[Any]:
    if text.lstrip().startswith(("{", "[")):
        try:
            yield json.loads(text)
            return
        except json.JSONDecodeError:
            pass  # YAML flow style also starts with "{": let the YAML parser judge it.
    try:
        yield from list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as error:
        raise InputError(f"{source}: invalid YAML{yaml_error(error)}") from None


def yaml_error(error: yaml.YAMLError) -> str:
    """Where and what, on one line: `` at line 3, column 5: <problem>``."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{where}: {problem}"


def _unwrap(doc: Any) -> Iterator[Any]:
    """The objects in a document; an empty document has none, a non-object is passed on for
    the parser to count as ignored."""
    if doc is None:
        return
    if not isinstance(doc, dict):
        yield doc
        return
    kind = doc.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list):
        item_kind = kind[: -len("List")] or None
        for item in doc["items"]:
            if isinstance(item, dict) and item_kind and "kind" not in item:
                item = {"kind": item_kind, "apiVersion": doc.get("apiVersion"), **item}
            yield from _unwrap(item)
    else:
        yield doc


def _text(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"cannot read {name}: not UTF-8 text") from None


def _read(path: Path) -> str:
    try:
        return _text(str(path), path.read_bytes())
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None


def _files(source: str) -> Iterator[tuple[str, str]]:
    """(name, text) of a file, or of a directory's manifest files (not recursive)."""
    path = Path(source)
    if not path.is_dir():
        yield source, _read(path)
        return
    try:
        entries = sorted(p for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES)
    except OSError as error:
        raise InputError(f"cannot read {source}: {error.strerror or error}") from None
    for entry in entries:
        if entry.is_file():
            yield str(entry), _read(entry)


def _stdin(stream: TextIO) -> str:
    binary = getattr(stream, "buffer", None)
    if binary is not None:
        return _text("<stdin>", binary.read())
    return stream.read()


def load_documents(sources: list[str], stdin: TextIO | None = None) -> list[Any]:
    """Every API object in ``sources`` (paths, directories, or "-" for standard input)."""
    documents: list[Any] = []
    for source in sources:
        if source == "-":
            texts: Iterator[tuple[str, str]] = iter([("<stdin>", _stdin(stdin or sys.stdin))])
        else:
            texts = _files(source)
        for name, text in texts:
            for doc in _decode(text, name):
                documents.extend(_unwrap(doc))
    return documents
