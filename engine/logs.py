"""Structured logs: one event name and key=value pairs per line, with the request id bound.

``log.info("hold_created", slot="...", ttl_s=600)`` prints
``2026-11-27T12:00:00Z info hold_created slot=... ttl_s=600 request_id=...``.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

from aiohttp.web_protocol import RequestPayloadError

request_id: ContextVar[str] = ContextVar("request_id", default="-")
# The staff agent an admin request's token names (engine/admin.py): in its log lines and
# its audit rows. Set by the admin token's check; aiohttp runs each request in a task of
# its own, so the next request on that connection starts without it.
agent: ContextVar[str | None] = ContextVar("agent", default=None)

_logger = logging.getLogger("guichet")


def _format_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class EventLog:
    """A thin front of the standard logger that renders events as key=value."""

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if not _logger.isEnabledFor(level):
            return
        parts = [event] + [f"{k}={_format_value(v)}" for k, v in fields.items()]
        rid = request_id.get()
        if rid != "-":
            parts.append(f"request_id={rid}")
        if (who := agent.get()) is not None:
            parts.append(f"agent={who}")
        _logger.log(level, " ".join(parts))

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields)

    def exception(self, event: str, *, exc: BaseException | None = None, **fields: Any) -> None:
        """An error with a traceback: of the exception being handled, or of ``exc``."""
        parts = [event] + [f"{k}={_format_value(v)}" for k, v in fields.items()]
        _logger.error(
            " ".join([*parts, f"request_id={request_id.get()}"]),
            exc_info=exc if exc is not None else True,
        )


log = EventLog()


class _Formatter(logging.Formatter):
    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%SZ")
        line = f"{stamp} {record.levelname.lower()} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _not_an_unreadable_body(record: logging.LogRecord) -> bool:
    """Whether an aiohttp.server record is not its "Unhandled exception" for a request
    body it could not read (a Content-Encoding that does not decode): the engine answered
    that request 400 already (engine/web.py), and aiohttp logged it again, with a
    traceback at ERROR, as it read the body's rest: a log flood anyone could send (an
    audit found it)."""
    return not (record.exc_info and isinstance(record.exc_info[1], RequestPayloadError))


def quiet_unreadable_bodies() -> None:
    """Drop aiohttp's second report of a body it could not read (idempotent)."""
    logging.getLogger("aiohttp.server").addFilter(_not_an_unreadable_body)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
