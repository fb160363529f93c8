"""core.logs: one format for every process, JSON off a terminal and text on one."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.logs import (
    JsonLogFormatter,
    TextLogFormatter,
    add_logging_arguments,
    configure_logging,
    log_format_for,
)

REPO = Path(__file__).resolve().parents[2]

# A long-running command's logging set-up, as each CLI does it, in a real process whose
# standard error is whatever the test gives it.
PROGRAM = """
import argparse, logging, sys
from core.logs import add_logging_arguments, configure_logging
parser = argparse.ArgumentParser()
add_logging_arguments(parser)
args = parser.parse_args(sys.argv[1:])
configure_logging(args)
fields = {"peer": "spiffe://example.org/ns/a/sa/b", "port": 8080}
logging.getLogger("trellis.example").warning("denied", extra={"fields": fields})
logging.getLogger("trellis.example").debug("hidden at info")
"""


def _parse(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_logging_arguments(parser)
    return parser.parse_args(args)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("trellis").setLevel(logging.NOTSET)


def _run(args: list[str], *, tty: bool) -> str:
    """The program's standard error: a pipe, or the child side of a pseudo-terminal."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-c", PROGRAM, *args]
    if not tty:
        done = subprocess.run(argv, env=env, capture_output=True, timeout=30, check=True)
        return done.stderr.decode()
    parent, child = pty.openpty()
    try:
        proc = subprocess.Popen(argv, env=env, stderr=child, stdout=subprocess.DEVNULL)
        os.close(child)
        chunks = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                chunk = os.read(parent, 4096)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=30)
        return b"".join(chunks).decode().replace("\r\n", "\n")
    finally:
        os.close(parent)


def test_a_process_whose_stderr_is_a_pipe_logs_json_lines() -> None:
    lines = _run([], tty=False).splitlines()
    assert len(lines) == 1  # the DEBUG line is below the default level
    doc = json.loads(lines[0])
    assert doc["level"] == "warning"
    assert doc["logger"] == "trellis.example"
    assert doc["event"] == "denied"
    assert doc["peer"] == "spiffe://example.org/ns/a/sa/b"
    assert doc["port"] == 8080


def test_a_process_on_a_terminal_logs_text_with_its_fields() -> None:
    lines = _run([], tty=True).splitlines()
    assert len(lines) == 1
    assert " WARNING trellis.example: denied " in lines[0]
    assert "peer=spiffe://example.org/ns/a/sa/b port=8080" in lines[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


def test_log_format_overrides_what_the_terminal_suggests() -> None:
    assert json.loads(_run(["--log-format", "json"], tty=True).splitlines()[0])["port"] == 8080
    assert "port=8080" in _run(["--log-format", "text"], tty=False)


def test_log_level_debug_shows_debug_lines() -> None:
    events = [
        json.loads(line)["event"] for line in _run(["--log-level", "debug"], tty=False).splitlines()
    ]
    assert events == ["denied", "hidden at info"]


def test_auto_means_json_for_anything_that_is_not_a_terminal() -> None:
    assert log_format_for("auto", io.StringIO()) == "json"
    assert log_format_for("text", io.StringIO()) == "text"
    closed = io.StringIO()
    closed.close()
    assert log_format_for("auto", closed) == "json"


def test_configure_logging_replaces_the_handler_of_an_earlier_call(restore_logging: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(_parse(["--log-format", "json"]), stream=first)
    configure_logging(_parse(["--log-format", "json"]), stream=second)
    logging.getLogger("trellis.example").info("once")
    assert first.getvalue() == ""
    assert [json.loads(line)["event"] for line in second.getvalue().splitlines()] == ["once"]


def test_libraries_stay_at_warning_while_our_loggers_log_info(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging(_parse(["--log-format", "json"]), stream=out)
    logging.getLogger("aiohttp.access").info("GET /metrics")  # a scrape, every few seconds
    logging.getLogger("sidecar.inbound").info("ours")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["ours"]


def _record(msg: str, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("trellis.x", logging.INFO, __file__, 1, msg, None, None)
    record.fields = fields
    return record


def test_text_quotes_values_that_would_split_the_line() -> None:
    line = TextLogFormatter().format(_record("e", reason="a b", rule='x="y"', n=None, ok=True))
    assert line.endswith(' e reason="a b" rule="x=\\"y\\"" ok=true')


def test_a_field_cannot_hide_the_formats_own_keys() -> None:
    doc = json.loads(JsonLogFormatter().format(_record("real", event="fake", level="x", k=1)))
    assert (doc["event"], doc["level"], doc["k"]) == ("real", "info", 1)
