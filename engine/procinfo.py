"""Facts about the current process that every component reports in its stats."""

from __future__ import annotations


def rss_mb() -> float:
    """Private (anonymous) resident memory of this process in MiB, from /proc (0.0 elsewhere).

    Anonymous memory only: the KV cache of a prefill instance lives in shared memory that its
    messager maps too, and its pages count as resident when first touched, which would look
    like growth in a leak check although the cache's size is fixed.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0
