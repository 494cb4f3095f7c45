"""Re-wiring after a crash is bounded (issue #16): a messager that cannot be attached is
restarted together with its prefill instance (which re-creates the KV cache it maps), and what
still cannot be wired in is given up instead of being retried every round for ever."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorUnavailableError

from cluster import supervisor as sup
from cluster.supervisor import MAX_SETUP_FAILURES, Health, Supervisor
from tests.unit.cluster.test_supervisor import D0, M0, P0, FakeDeployment


class Rig:
    """A supervisor whose probes, revivals, kills and announcements are scripted."""

    def __init__(self, monkeypatch) -> None:
        self.dep = FakeDeployment()
        self.supervisor = Supervisor(self.dep)
        self.health = {P0: Health.ALIVE, D0: Health.ALIVE, M0: Health.ALIVE}
        self.broken: dict = {}  # worker -> exception its revival raises
        self.revived: list = []
        self.killed: list[str] = []
        self.announced: list = []
        s = self.supervisor
        monkeypatch.setattr(s, "_probe", lambda w: self.health[w])
        monkeypatch.setattr(s, "_revive", self._revive)
        monkeypatch.setattr(s, "_announce_down", self.announced.append)
        monkeypatch.setattr(sup.ray, "kill", lambda h, no_restart: self.killed.append(h.name))

    def _revive(self, worker) -> None:
        self.revived.append(worker)
        if worker in self.broken:
            raise self.broken[worker]

    def rounds(self, count: int) -> None:
        for _ in range(count):
            self.supervisor.check_all()


def restarting() -> ActorUnavailableError:
    return ActorUnavailableError("the actor is restarting", None)


@pytest.fixture
def rig(monkeypatch) -> Rig:
    return Rig(monkeypatch)


def test_a_messager_that_cannot_attach_is_restarted_with_its_prefill_instance(rig) -> None:
    rig.health[M0] = Health.RESTARTED
    rig.broken[M0] = RuntimeError("shared KV segment 'pdserve-...-prefill-0_ab' does not exist")
    rig.rounds(MAX_SETUP_FAILURES)
    assert rig.revived == [M0] * MAX_SETUP_FAILURES
    assert rig.killed == ["prefill-0", "messager-0"]
    assert rig.announced == [M0, P0]  # P's requests move to other instances
    # P is restarting: the messager waits for it (P's revival sets the messager up again).
    rig.broken = {P0: restarting()}
    rig.rounds(2)
    assert rig.revived[MAX_SETUP_FAILURES:] == [P0, P0]
    rig.broken = {}
    rig.health[P0] = rig.health[M0] = Health.ALIVE
    rig.rounds(3)
    assert rig.revived[-1] == P0 and rig.supervisor.recoveries == ["prefill-0"]
    assert rig.killed == ["prefill-0", "messager-0"] and rig.supervisor.lost == []


def test_what_cannot_be_wired_in_after_a_fresh_restart_is_given_up(rig) -> None:
    rig.health[M0] = Health.RESTARTED
    rig.broken = {M0: RuntimeError("no"), P0: RuntimeError("still no")}
    rig.rounds(MAX_SETUP_FAILURES)  # the messager: restarted afresh with P
    rig.rounds(MAX_SETUP_FAILURES)  # P's setups fail as well: given up
    assert rig.supervisor.lost == ["prefill-0"]
    assert rig.killed == ["prefill-0", "messager-0"]  # one fresh restart, no more
    tries = len(rig.revived)
    rig.rounds(5)
    assert len(rig.revived) == tries  # no retry for ever


def test_an_instance_that_cannot_be_set_up_is_restarted_once_then_given_up(rig) -> None:
    rig.health[D0] = Health.DEAD
    rig.broken[D0] = RuntimeError("setup failed")
    rig.rounds(2 * MAX_SETUP_FAILURES + 3)
    assert rig.killed == ["decode-0"]
    assert rig.supervisor.lost == ["decode-0"]
    assert rig.revived == [D0] * (2 * MAX_SETUP_FAILURES)
    assert rig.announced == [D0]


def test_an_actor_ray_does_not_restart_is_given_up(rig, monkeypatch) -> None:
    rig.health[D0] = Health.DEAD
    rig.broken[D0] = restarting()
    clock = [1000.0]
    monkeypatch.setattr(sup.time, "monotonic", lambda: clock[0])
    rig.rounds(3)
    assert rig.supervisor.lost == []  # still restarting: waited for, up to startup_timeout_s
    clock[0] += rig.dep.config.cluster.startup_timeout_s + 1
    rig.rounds(3)
    assert rig.supervisor.lost == ["decode-0"] and len(rig.revived) == 4


def test_with_restarts_off_a_dead_actor_is_given_up_at_once(rig) -> None:
    rig.dep.config.cluster.restart_crashed_actors = False
    rig.health[M0] = Health.DEAD
    rig.broken[M0] = restarting()
    rig.rounds(3)
    assert rig.supervisor.lost == ["messager-0"] and rig.revived == [M0]
    assert rig.announced == [M0, P0]  # P cannot hand KV over without its messager


def test_instances_down_or_lost_are_not_given_back_to_the_router(rig) -> None:
    rig.health[P0] = rig.health[M0] = Health.DEAD
    rig.broken = {P0: restarting(), M0: restarting()}
    rig.rounds(1)
    s = rig.supervisor
    assert s._out_of_service(D0) == {P0}
    assert s._out_of_service(P0) == set()  # the one being revived goes back
