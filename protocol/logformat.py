"""Log line formats shared by the coordinator and the node: `event key=value ...` text, or one JSON
object per line for log collectors (`--log-format json`).

It lives in `protocol` because that is the one package both processes may import (the layering in
tests/unit/test_import_direction.py); it does no I/O, it only turns records into strings."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
ENV_LOG_FORMAT = "SPARECYCLES_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# `key=value`, `key="quoted \" value"` or `key='a %r repr'` in a rendered message, as kv() and the coordinator's
# "%s=%s" messages write them. The event word before the first pair is not a field.
_PAIR = re.compile(r"""(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\S+)""")
# Fields a message may not overwrite: a value sent by a peer (a node id, a reason) lands in a field
# and must not pass itself off as the record's level or time.
RESERVED = frozenset({"ts", "level", "logger", "msg", "exc"})


class KvMessage(str):
    """A message built by `kv()`: renders as its text, and keeps its event and fields so the JSON
    formatter emits them as they were, typed, instead of parsing the text back."""

    event: str
    fields: dict[str, Any]

    def __new__(cls, event: str, fields: dict[str, Any]) -> KvMessage:
        text = " ".join([event, *(f"{k}={_value(v)}" for k, v in fields.items())])
        message = super().__new__(cls, text)
        message.event = event
        message.fields = fields
        return message


def _value(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '="' for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def kv(event: str, **fields: Any) -> KvMessage:
    """`kv("task_done", lease="L1", elapsed=0.25)` → `task_done lease=L1 elapsed=0.25`."""
    return KvMessage(event, fields)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
    if len(text) >= 2 and text[0] == text[-1] == "'":  # %r of a str
        return text[1:-1]
    return text


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `ts` (UTC, ISO 8601 with milliseconds), `level`, `logger`, `msg`,
    then the message's key=value fields as fields of their own, and `exc` with a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "msg": message,
        }
        raw = record.msg
        if isinstance(raw, KvMessage) and not record.args:
            doc["event"] = raw.event
            fields = {k: _jsonable(v) for k, v in raw.fields.items()}
        else:
            fields = {m.group(1): _unquote(m.group(2)) for m in _PAIR.finditer(message)}
        for key, value in fields.items():
            doc.setdefault(key if key not in RESERVED else f"field_{key}", value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        # One line whatever the message holds: json.dumps escapes newlines inside strings.
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def make_handler(stream: Any, log_format: str) -> logging.Handler:
    """A stream handler writing `log_format` ("text" or "json"); ValueError for anything else."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def announce(line: str, log_format: str, logger: str) -> str:
    """A process's "... ready" line as its log format writes lines: the text as it is, or one JSON
    object (level INFO, the text as `msg`, its key=value pairs as fields). Printed whatever the log
    level, because supervisors and scripts wait for it; in JSON mode every line of the stream then
    parses, and `msg` still starts with the words they look for."""
    if log_format != "json":
        return line
    record = logging.LogRecord(logger, logging.INFO, __file__, 0, line, None, None)
    return JsonFormatter().format(record)
