"""Structured logging (structlog): console output for people, JSON lines for log collectors."""

from __future__ import annotations

import logging
import sys

import structlog


class _StderrLogger:
    """Writes to whatever sys.stderr is at the time of the call (it may be replaced after start-up)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


_library_configured = False


def _renderer(fmt: str) -> structlog.typing.Processor:
    if fmt == "json":
        return structlog.processors.JSONRenderer()
    # Plain tracebacks: rich's pretty ones print local variables, which may hold a request's API key.
    return structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)


def configure(level: str = "INFO", fmt: str = "console") -> None:
    """Called by the processes SmartMail owns (CLI, worker, beat), never on import: an application
    that calls smartmail.send() keeps its own logging configuration."""
    renderer = _renderer(fmt)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_args: _StderrLogger(),
        cache_logger_on_first_use=True,
    )
    # flufl.bounce logs a line per detector it tries on each bounce: noise at INFO.
    logging.getLogger("flufl.bounce").setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))


def configure_for_library(level: str = "INFO", fmt: str = "console") -> None:
    """Called once per process when SmartMail is first used as a library (by get_settings), so that
    SMARTMAIL_LOG_LEVEL holds there too, without taking over an application's own logging:
    - structlog already configured (structlog.is_configured()): the application's setup is kept;
    - stdlib logging configured (the root logger has handlers): SmartMail's events are handed to
      `logging.getLogger("smartmail.…")`, so the application's handlers, format and levels apply;
    - neither: lines on stderr, as the CLI and workers write them."""
    global _library_configured
    if _library_configured:
        return
    _library_configured = True
    if structlog.is_configured():
        return
    if not logging.getLogger().handlers:
        configure(level, fmt)
        return
    # The application's handlers add the time and level; the message is the event and its fields.
    renderer = _renderer(fmt)
    processors: list = [structlog.contextvars.merge_contextvars]
    if fmt == "json":
        processors.append(structlog.processors.format_exc_info)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
