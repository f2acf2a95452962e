"""Reading manifests: files, directories and standard input, YAML or JSON, into API objects.

This module only reads and decodes; what the objects mean is :mod:`kpgen.core.parse`'s business.
List kinds are unwrapped, both ``kind: List`` (what ``kubectl get -o yaml`` prints) and the
API's own ``ServiceList``/``EndpointSliceList``, whose items carry no kind of their own.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# A line that starts or ends a document. YAML forbids such a line inside a document's content
# (even in a block or quoted scalar), so a stream splits at them exactly.
_DOCUMENT_MARKER = re.compile(r"^(?:---|\.\.\.)(?=[ \t\r\n]|$)", re.M)
_YAML_LINE = re.compile(r"\bline (\d+)")


class InputError(Exception):
    """Input that cannot be read at all: a missing file, bad YAML or JSON."""


def _documents(text: str) -> Iterator[tuple[int, str]]:
    """(first line, text) of each document of a YAML stream."""
    starts = [m.start() for m in _DOCUMENT_MARKER.finditer(text)]
    bounds = [0, *starts] if not starts or starts[0] else starts
    for begin, end in zip(bounds, [*bounds[1:], len(text)], strict=True):
        yield text.count("\n", 0, begin), text[begin:end]


def decode_yaml(text: str, source: str) -> list[Any]:
    """Every document of a YAML stream (YAML 1.2, the core schema; duplicate keys: the last
    wins; ``<<`` merge keys expanded), or :class:`InputError` naming ``source``, the line and
    the problem. yaml-rs, a Rust parser, decodes 10,000 services in a tenth of PyYAML's time
    and a third of its memory (docs/performance.md)."""
    import yaml_rs  # here: JSON input, the API's own, does without it

    documents = []
    for first_line, chunk in _documents(text.removeprefix("\ufeff")):
        try:
            doc = yaml_rs.loads(
                chunk,
                parse_datetime=False,
                duplicate_key_policy=yaml_rs.DuplicateKeyPolicy.LastWins,
            )
        except (yaml_rs.YAMLDecodeError, ValueError, RecursionError) as error:
            raise InputError(f"{source}: invalid YAML{_yaml_error(error, first_line)}") from None
        documents.append(_merged(doc) if "<<" in chunk else doc)
    return [doc for doc in documents if doc is not None]


def _yaml_error(error: Exception, first_line: int) -> str:
    """`` at line N, column M: <problem>`` on one line, N counted in the whole stream."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return f": {type(error).__name__}"
    head, problem = lines[0], lines[-1]
    where = _YAML_LINE.sub(lambda m: f"line {int(m.group(1)) + first_line}", head)
    where = where.removeprefix("YAML parse error")
    return f"{where}: {problem}" if problem != lines[0] else f": {where.strip()}"


def _merged(value: Any) -> Any:
    """``value`` with YAML merge keys expanded (``<<: *base`` or ``<<: [*a, *b]``): the
    merged mappings' keys, earlier ones first, under the mapping's own."""
    if isinstance(value, list):
        return [_merged(item) for item in value]
    if not isinstance(value, dict):
        return value
    sources = value.get("<<")
    bases = [sources] if isinstance(sources, dict) else sources
    if not isinstance(bases, list):
        return {key: _merged(item) for key, item in value.items()}
    merged: dict[Any, Any] = {}
    for base in reversed(bases):  # of two merged mappings, the earlier one's key wins
        if isinstance(base, dict):
            merged.update(_merged(base))
    merged.update((key, _merged(item)) for key, item in value.items() if key != "<<")
    return merged


def _decode(text: str, source: str) -> Iterator[Any]:
    if text.lstrip().startswith(("{", "[")):
        try:
            decoded = json.loads(text)
        except json.JSONDecodeError:
            pass  # YAML flow style also starts with "{": let the YAML parser judge it.
        except RecursionError:  # hostile nesting: no manifest is that deep
            raise InputError(f"{source}: invalid JSON: nested too deeply") from None
        else:
            yield decoded
            return
    yield from decode_yaml(text, source)


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


Source = tuple[str, bytes | str | Path]
"""(name, content) of one manifest, not yet decoded: standard input's bytes (or text), or a
file's path, read with the decoding (in both halves of kpgen/cli/halves.py, at once)."""


def _text(name: str, content: bytes | str | Path) -> str:
    if isinstance(content, Path):
        try:
            content = content.read_bytes()
        except OSError as error:
            raise InputError(f"cannot read {name}: {error.strerror or error}") from None
    if isinstance(content, str):
        return content
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"cannot read {name}: not UTF-8 text") from None


def _file(path: Path) -> Path:
    """A manifest file that exists (read later, by :func:`decode_manifests`)."""
    try:
        path.stat()
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None
    return path


def _files(source: str) -> Iterator[Source]:
    """(name, path) of a file, or of a directory's manifest files (not recursive)."""
    path = Path(source)
    if not path.is_dir():
        yield source, _file(path)
        return
    try:
        entries = sorted(p for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES)
    except OSError as error:
        raise InputError(f"cannot read {source}: {error.strerror or error}") from None
    for entry in entries:
        if entry.is_file():
            yield str(entry), entry


def _stdin(stream: TextIO) -> bytes | str:
    binary = getattr(stream, "buffer", None)
    return binary.read() if binary is not None else stream.read()


def read_manifests(sources: list[str], stdin: TextIO | None = None) -> list[Source]:
    """Every manifest in ``sources`` (paths, directories, or "-" for standard input): standard
    input read, files found (not read: :func:`decode_manifests` reads them)."""
    found: list[Source] = []
    for source in sources:
        if source == "-":
            found.append(("<stdin>", _stdin(stdin or sys.stdin)))
        else:
            found.extend(_files(source))
    return found


def manifests_size(manifests: list[Source]) -> int:
    """How many bytes (or characters) the manifests hold."""
    return sum(c.stat().st_size if isinstance(c, Path) else len(c) for _, c in manifests)


def decode_manifests(manifests: list[Source]) -> list[Any]:
    """Every API object in manifests found by :func:`read_manifests`."""
    documents: list[Any] = []
    for name, content in manifests:
        for doc in _decode(_text(name, content), name):
            documents.extend(_unwrap(doc))
    return documents


def load_documents(sources: list[str], stdin: TextIO | None = None) -> list[Any]:
    """Every API object in ``sources`` (paths, directories, or "-" for standard input)."""
    return decode_manifests(read_manifests(sources, stdin))
