"""Facts about the current process that every component reports in its stats."""

from __future__ import annotations

import os


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc; 0.0 where unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
