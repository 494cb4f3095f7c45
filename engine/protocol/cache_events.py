"""Channel instance -> router: what entered and left an instance's prefix cache.

An instance sends one `PrefixCacheEvents` per publish interval when its prefix cache changed,
to every router. The router's prefix index (`cluster/router/prefix_index.py`) keeps per instance
the block keys it holds; the keys are `engine.prefix_keys`', which P, D and the router compute
alike. Reports are numbered per incarnation of the instance, so the router can tell a restart
or a lost report (and then forgets what it knew of that instance).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.protocol.identity import InstanceId


@dataclass(frozen=True)
class PrefixCacheEvents:
    """Block keys cached and evicted since the instance's previous report, with its capacity.

    `stored` and `removed` are disjoint (a key's last change wins), so their order does not
    matter; `cleared` means every earlier key is gone (applied before `stored`)."""

    instance: InstanceId  # as in its TokenBatch.source
    incarnation: str  # new for every start of the instance
    seq: int  # 0, 1, 2, ... within an incarnation
    block_size: int
    num_blocks: int
    free_blocks: int
    stored: list[bytes] = field(default_factory=list)  # 32-byte keys (engine/prefix_keys.py)
    removed: list[bytes] = field(default_factory=list)
    cleared: bool = False
