"""What ``dtl-train`` and ``dtl-predict`` print, through :mod:`logging`: the logger
``dtl_kernels`` writes its messages plainly to the standard output (the process's current
one, so a caller that swaps it still sees them); ``--quiet`` keeps only warnings and
errors, ``--verbose`` adds the details. Errors themselves are one ``…: error:`` line on
the standard error, written by the command line."""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("dtl_kernels")


class _Stdout(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 — logging's own convention
            self.handleError(record)


def configure(quiet: bool = False, verbose: bool = False) -> logging.Logger:
    """Send the package's messages to stdout at the level the flags ask for."""
    if not any(isinstance(h, _Stdout) for h in LOGGER.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False
    LOGGER.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    return LOGGER
