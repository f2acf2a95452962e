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
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise InputError(f"{source}: invalid YAML{where}: {problem}") from None


def _unwrap(doc: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(doc, dict):
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


def _files(source: str) -> Iterator[tuple[str, str]]:
    path = Path(source)
    try:
        if path.is_dir():
            entries = sorted(p for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES)
            for entry in entries:
                yield str(entry), entry.read_text(encoding="utf-8")
        else:
            yield source, path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read {source}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise InputError(f"cannot read {source}: not UTF-8 text") from None


def load_documents(sources: list[str], stdin: TextIO | None = None) -> list[dict[str, Any]]:
    """Every API object in ``sources`` (paths, directories, or "-" for standard input)."""
    documents: list[dict[str, Any]] = []
    for source in sources:
        if source == "-":
            texts: Iterator[tuple[str, str]] = iter([("<stdin>", (stdin or sys.stdin).read())])
        else:
            texts = _files(source)
        for name, text in texts:
            for doc in _decode(text, name):
                documents.extend(_unwrap(doc))
    return documents
