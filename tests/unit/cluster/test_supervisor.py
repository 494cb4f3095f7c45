"""The supervisor's verdicts and what it does about them, without a Ray cluster."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster import supervisor as sup
from cluster.config import parse_config
from cluster.supervisor import Health, Probe, Supervisor, judge
from engine.config import Role
from engine.protocol.identity import InstanceId, MessagerId

P0 = InstanceId(Role.PREFILL, 0)
D0 = InstanceId(Role.DECODE, 0)
M0 = MessagerId(0)


@pytest.mark.parametrize(
    ("answer", "health"),
    [
        (0.3, Health.ALIVE),
        (59.9, Health.ALIVE),
        (60.1, Health.STALLED),  # answers, but its loop has not gone round for too long
        (None, Health.RESTARTED),  # Ray restarted it between two checks: not set up
        (Probe.DEAD, Health.DEAD),
        (Probe.NO_ANSWER, Health.UNKNOWN),  # busy method threads: left to request deadlines
    ],
)
def test_judge(answer, health) -> None:
    assert judge(answer, timeout_s=60.0) is health
    assert health.failed == (health in (Health.DEAD, Health.RESTARTED, Health.STALLED))


class FakeDeployment:
    def __init__(self) -> None:
        config = parse_config({"prefill": {"instances": 1}, "decode": {"instances": 1}})
        config.cluster.heartbeat_timeout_s = 60.0
        self.config = config
        self.handles = {w: SimpleNamespace(name=str(w)) for w in (P0, D0, M0)}
        self.controller = None  # no elastic controller: membership is the config's

    def workers(self):
        return list(self.handles)

    def actor(self, worker):
        return self.handles[worker]


@pytest.fixture
def rig(monkeypatch):
    dep = FakeDeployment()
    supervisor = Supervisor(dep)
    answers = {P0: 0.1, D0: 0.1, M0: 0.1}
    killed: list[str] = []
    recovered: list = []
    monkeypatch.setattr(supervisor, "_probe", lambda w: judge(answers[w], 60.0))
    monkeypatch.setattr(supervisor, "_recover", recovered.append)
    monkeypatch.setattr(sup.ray, "kill", lambda handle, no_restart: killed.append(handle.name))
    return supervisor, answers, killed, recovered


def test_a_stalled_loop_is_killed_for_a_restart_then_recovered(rig) -> None:
    supervisor, answers, killed, recovered = rig
    supervisor.check_all()
    assert killed == [] and recovered == []
    answers[D0] = 61.0
    supervisor.check_all()
    assert killed == ["decode-0"] and recovered == [D0]
    assert supervisor.stalls == ["decode-0"]


def test_dead_and_restarted_actors_are_recovered_without_a_kill(rig) -> None:
    supervisor, answers, killed, recovered = rig
    answers[P0] = Probe.DEAD
    answers[M0] = None
    supervisor.check_all()
    assert killed == [] and recovered == [P0, M0]


def test_an_actor_that_does_not_answer_is_left_alone(rig) -> None:
    supervisor, answers, killed, recovered = rig
    answers[D0] = Probe.NO_ANSWER
    supervisor.check_all()
    assert killed == [] and recovered == []


def test_one_failing_check_does_not_stop_the_round(rig, monkeypatch) -> None:
    supervisor, _, _, recovered = rig

    def probe(worker):
        if worker == P0:
            raise RuntimeError("injected")
        return judge(Probe.DEAD, 60.0)

    monkeypatch.setattr(supervisor, "_probe", probe)
    supervisor.check_all()
    assert recovered == [D0, M0]


def test_heartbeat_timeout_is_a_described_yaml_key() -> None:
    config = parse_config({"mixed": {"instances": 1}, "cluster": {"heartbeat_timeout_s": 30}})
    assert config.cluster.heartbeat_timeout_s == 30.0
    field = type(config.cluster).model_fields["heartbeat_timeout_s"]
    assert "restarts" in field.description
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        parse_config({"mixed": {"instances": 1}, "cluster": {"heartbeat_timeout_s": 0}})


def test_an_instance_the_elastic_controller_removed_is_let_go_not_recovered(
    rig, monkeypatch
) -> None:
    supervisor, answers, killed, recovered = rig
    answers[D0] = Probe.DEAD  # killed by the controller after it listed it no more
    synced = []

    def sync_members() -> None:  # what reading the controller's members() does
        synced.append(True)
        supervisor.dep.handles.pop(D0, None)

    monkeypatch.setattr(supervisor, "sync_members", sync_members)
    supervisor._check(D0)
    assert synced and recovered == [] and killed == []
