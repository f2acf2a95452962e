"""Logging for ``kpgen run``: one line per event, as text or JSON (``--log-format json``)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

# Attributes every LogRecord has; anything else was passed with extra= and goes into JSON.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(entry, default=str)


def setup_logging(verbose: int, log_format: str) -> None:
    """-v 0: syncs, warnings and errors; -v 1 and more: also list/watch and HTTP detail."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # urllib3 warns about each of its own retries of a refused connection: kpgen's informers
    # say once what failed (kpgen.inputs.api.Trouble)
    logging.getLogger("urllib3").setLevel(logging.ERROR if verbose < 3 else logging.DEBUG)
    logging.getLogger("kubernetes").setLevel(logging.WARNING if verbose < 3 else logging.DEBUG)
