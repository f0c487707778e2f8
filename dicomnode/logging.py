"""The one place that configures logging: structlog JSON lines on stdout (journald reads them).

Library loggers (pynetdicom, pydicom) go through the same renderer so every line is JSON. The
level comes from the config (``node.log_level``) unless ``DICOMNODE_LOG_LEVEL`` overrides it.
Callers bind UIDs, AE titles and addresses only; no patient names, IDs, birth dates or accession
numbers are ever logged. pynetdicom and pydicom are held at WARNING because their INFO/DEBUG
output can dump request identifiers and data elements; highdicom at ERROR because some of its
warnings quote attribute values such as patient names. Python warnings (pydicom's and
highdicom's value-validation warnings quote the offending value) are routed into logging and
dropped below ERROR for the same reason.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, Any

import structlog

ENV_LEVEL = "DICOMNODE_LOG_LEVEL"
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def resolve_level(configured: str) -> int:
    """The numeric level: ``$DICOMNODE_LOG_LEVEL`` if set, else ``configured``."""
    name = os.environ.get(ENV_LEVEL, configured).strip().lower()
    if name not in _LEVELS:
        raise ValueError(f"log level must be one of {sorted(_LEVELS)}, got {name!r}")
    return _LEVELS[name]


def configure_logging(level: str = "info", stream: IO[str] | None = None) -> None:
    """Send structlog and stdlib logging to ``stream`` (stdout) as JSON lines at ``level``."""
    numeric = resolve_level(level)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger("pynetdicom").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("pydicom").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("highdicom").setLevel(max(numeric, logging.ERROR))
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(max(numeric, logging.ERROR))


def get_logger(name: str) -> Any:
    """A structlog logger for module ``name`` (bind UIDs to it, never patient data)."""
    return structlog.stdlib.get_logger(name)
