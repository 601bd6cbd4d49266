"""structlog set-up shared by every service.

Events have stable dotted names (``broker.batch_committed``) and structured
fields. Output is JSON when standard error is not a terminal and readable
colours when it is. Fields whose names suggest a secret are masked before
anything is written, as a second line of defence: code never logs tokens.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_MARKERS = ("token", "secret", "password", "authorization")


def _mask_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if any(marker in key.lower() for marker in _SECRET_MARKERS):
            event_dict[key] = "***"
    return event_dict


def configure_logging(level: str | None = None, *, json: bool | None = None) -> None:
    """Configure structlog and the standard library's root logger once.

    ``level`` defaults to ``RUNLEDGER_LOG_LEVEL`` or INFO; ``json`` defaults to
    "standard error is not a terminal".
    """
    level_name = (level or os.environ.get("RUNLEDGER_LOG_LEVEL") or "INFO").upper()
    numeric_level = logging.getLevelName(level_name)
    if not isinstance(numeric_level, int):
        numeric_level = logging.INFO
    if json is None:
        json = not sys.stderr.isatty()

    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )

    # Libraries log through the standard library; keep them quiet but visible.
    logging.basicConfig(level=max(numeric_level, logging.WARNING), stream=sys.stderr)


def get_logger(name: str) -> Any:
    """A structlog logger bound to the component ``name`` (``broker``, ...)."""
    return structlog.get_logger(component=name)
