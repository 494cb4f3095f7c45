"""An instance's prefix-cache reports, fed into the router's index: the index follows the cache."""

from __future__ import annotations

from cluster.router.prefix_index import KeyChains, PrefixIndex
from engine.block_manager import BlockManager
from engine.prefix_events import CacheReporter
from tests.unit.engine.helpers import make_request

P0 = "prefill-0"


class Routers:
    """Stands in for the routers' inboxes: every report goes into that router's index."""

    def __init__(self) -> None:
        self.indexes: dict[str, PrefixIndex] = {}
        self.sent: list[tuple[str, object]] = []
        self.down: set[str] = set()

    def send(self, address: str, report) -> bool:
        if address in self.down:
            return False
        self.sent.append((address, report))
        self.indexes.setdefault(address, PrefixIndex(1000)).apply(report)
        return True


def _cache(bm: BlockManager, rid: str, prompt: list[int]) -> None:
    req = make_request(rid, prompt)
    bm.allocate(req, len(prompt))
    req.num_computed_tokens = len(prompt)
    bm.commit_full_blocks(req)
    bm.free(req)


def _held(routers: Routers, address: str, prompt: list[int]) -> int:
    return routers.indexes[address].cached_tokens(P0, KeyChains(prompt))


def test_reports_keep_every_router_in_step_with_the_cache() -> None:
    bm, routers = BlockManager(4, 4), Routers()
    reporter = CacheReporter(P0, bm, routers.send, interval_s=1.0)
    first, second = list(range(8)), list(range(100, 116))
    _cache(bm, "a", first)
    reporter.tick(now=10.0)  # no router known yet: nothing sent, the log is drained
    assert routers.sent == []
    reporter.add_routers(["r1"])
    reporter.tick(now=10.5)  # within the interval: nothing
    assert routers.sent == []
    reporter.tick(now=11.0)  # r1's first report: the whole cache
    assert routers.sent[-1][1].cleared and _held(routers, "r1", first) == 8
    _cache(bm, "b", second)  # evicts `first`
    reporter.add_routers(["r1", "r2"])
    reporter.tick(now=12.0)
    assert _held(routers, "r1", first) == 0 and _held(routers, "r1", second) == 16
    assert _held(routers, "r2", second) == 16  # r2 started from a snapshot
    assert [r.seq for a, r in routers.sent if a == "r1"] == [0, 1]
    reporter.tick(now=13.0)  # nothing changed: nothing sent
    assert len(routers.sent) == 3


def test_a_router_that_cannot_be_reached_starts_over() -> None:
    bm, routers = BlockManager(4, 4), Routers()
    reporter = CacheReporter(P0, bm, routers.send, interval_s=0.0)
    reporter.add_routers(["r1"])
    reporter.tick(now=1.0)
    routers.down.add("r1")
    _cache(bm, "a", list(range(8)))
    reporter.tick(now=2.0)  # lost: r1 is forgotten
    routers.down.clear()
    _cache(bm, "b", list(range(50, 54)))
    reporter.add_routers(["r1"])  # it is served again
    reporter.tick(now=3.0)
    report = routers.sent[-1][1]
    assert report.seq == 0 and report.cleared
    assert _held(routers, "r1", list(range(8))) == 8  # nothing lost
