"""What `pdserve serve` prints: its own lines; Ray's and NIXL's go to files unless --verbose.

The actors' output (NIXL's INFO lines, instance logs) stays in Ray's per-worker log files when
`cluster.log_to_driver` is off (launcher.init_ray). Ray's driver-side lines (its token
authentication warning, "Started a local Ray instance") come from the `ray` logger of this
process, which `route_ray_logs` points at a file.
"""

from __future__ import annotations

import logging
from pathlib import Path

LOG_FILE = Path("~/.cache/pdserve/logs/serve.log")
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
