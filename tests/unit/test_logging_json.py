"""`--log-format json`: one JSON object per line with ts, level, logger, msg and the message's
key=value pairs as fields (protocol/logformat.py), for the node's kv() events and the coordinator's
"%s=%s" messages alike."""

from __future__ import annotations

import io
import json
import logging
import sys
from typing import Any

import pytest

from node import logs
from protocol.logformat import JsonFormatter, announce, kv, make_handler


def record(msg: Any, *args: Any, level: int = logging.INFO, name: str = "sparecycles.coordinator",
           exc_info: Any = None) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args or None, exc_info)


def formatted(rec: logging.LogRecord) -> dict[str, Any]:
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    doc: dict[str, Any] = json.loads(line)
    return doc


def test_a_kv_event_keeps_its_fields_with_their_types() -> None:
    doc = formatted(record(kv("task_done", lease="L1", elapsed=0.25, slots=2, note="two words")))

    assert doc["level"] == "INFO" and doc["logger"] == "sparecycles.coordinator"
    assert doc["msg"] == 'task_done lease=L1 elapsed=0.25 slots=2 note="two words"'
    assert doc["event"] == "task_done"
    assert (doc["lease"], doc["elapsed"], doc["slots"], doc["note"]) == ("L1", 0.25, 2, "two words")
    assert doc["ts"].endswith("+00:00") and "T" in doc["ts"]


def test_a_percent_style_message_yields_its_key_value_pairs_as_fields() -> None:
    doc = formatted(record("job finished job=%s state=%s tasks=%d reason=%r", "j1", "failed", 3,
                           "task 7 failed: outputs contain NaN"))

    assert doc["msg"].startswith("job finished job=j1 state=failed tasks=3")
    assert (doc["job"], doc["state"], doc["tasks"]) == ("j1", "failed", "3")
    assert doc["reason"] == "task 7 failed: outputs contain NaN"


def test_a_field_cannot_pass_itself_off_as_the_records_level_or_message() -> None:
    """Attack: a peer-supplied value (a node id, a reason) logged as `level=...` or `msg=...` must
    not overwrite the record's own fields and fool a log pipeline's filters."""
    doc = formatted(record(kv("rejected", level="DEBUG", msg="all good", ts="1970")))

    assert doc["level"] == "INFO" and doc["msg"].startswith("rejected ")
    assert doc["field_level"] == "DEBUG" and doc["field_msg"] == "all good" and doc["field_ts"] == "1970"


def test_a_message_with_newlines_and_a_traceback_stays_one_line() -> None:
    """Attack: a value with a newline (a model's error text) must not forge a second log line."""
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("audit failed problem=%r", "line one\n{\"level\": \"INFO\"}", exc_info=sys.exc_info())
    line = JsonFormatter().format(rec)

    assert line.count("\n") == 0
    doc = json.loads(line)
    assert "ValueError: boom" in doc["exc"] and doc["level"] == "INFO"


def test_the_node_configures_json_on_the_root_logger() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("INFO", "json")
        stream = io.StringIO()
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler) and isinstance(handler.formatter, JsonFormatter)
        handler.setStream(stream)
        logging.getLogger("node").info(logs.kv("node_starting", owner="alice", slots=2))
        doc = json.loads(stream.getvalue())
        assert (doc["event"], doc["owner"], doc["slots"]) == ("node_starting", "alice", 2)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_an_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text, json"):
        make_handler(io.StringIO(), "xml")


def test_a_ready_line_is_its_text_or_one_json_object_that_still_begins_with_its_words() -> None:
    line = "node ready id=abc123 owner=alice slots=2"
    assert announce(line, "text", "node") == line
    doc = json.loads(announce(line, "json", "node"))
    assert doc["msg"] == line and doc["level"] == "INFO" and doc["logger"] == "node"
    assert (doc["id"], doc["owner"], doc["slots"]) == ("abc123", "alice", "2")
