"""What `pdserve serve` prints: its own lines; Ray's and NIXL's go to files unless --verbose.

The actors' output (NIXL's INFO lines, instance logs) stays in Ray's per-worker log files when
`cluster.log_to_driver` is off (launcher.init_ray). Ray's driver-side lines (its token
authentication warning, "Started a local Ray instance") come from the `ray` logger of this
process, which `route_ray_logs` points at a file.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOG_FILE = Path("~/.cache/pdserve/logs/serve.log")
STATUS_LOG_FILE = Path("~/.cache/pdserve/logs/status.log")
RAY_LOGS = "/tmp/ray/session_latest/logs"


def route_ray_logs(log_file: Path = LOG_FILE) -> Path:
    """Send the `ray` logger of this process to `log_file` (appended) instead of stderr."""
    import ray  # noqa: F401  (importing ray installs its stderr handler, replaced here)

    path = log_file.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("ray")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.propagate = False
    return path


def where_logs_are(driver_log: Path) -> str:
    return (
        f"logs: actors in {RAY_LOGS} (on each node), Ray's own lines in {driver_log} "
        "(--verbose prints them here)"
    )


def native_stderr_to(log_file: Path) -> Path:
    """Point file descriptor 2 at `log_file` (appended) for the rest of this process, and
    `sys.stderr` at the terminal it was. Ray's C++ core writes its warnings straight to fd 2
    (e.g. a GCS retry every second while joining an address that is not a Ray cluster);
    Python's lines, the CLI's own included, stay on the terminal."""
    path = log_file.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal = os.dup(2)
    sys.stderr = open(terminal, "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    return path
