"""One log line per event, `event key=value ...`, on stderr: greppable and machine-readable; with
`--log-format json` (or SPARECYCLES_LOG_FORMAT=json) one JSON object per line instead, the fields
of `kv()` as JSON fields (protocol/logformat.py)."""

from __future__ import annotations

import logging
import sys

from protocol.logformat import LOG_FORMATS, TEXT_FORMAT, kv, make_handler

FORMAT = TEXT_FORMAT
__all__ = ["FORMAT", "LOG_FORMATS", "configure", "kv"]


def configure(level: str | int = "INFO", log_format: str = "text") -> None:
    root = logging.getLogger()
    root.handlers[:] = [make_handler(sys.stderr, log_format)]
    root.setLevel(level if isinstance(level, int) else level.upper())
