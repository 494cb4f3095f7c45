"""With elastic.enabled an instance may serve another role than its name's: the deployment's
decode list and the instances told of a decode instance's death follow the roles served now."""

from __future__ import annotations

from cluster.config import parse_config
from cluster.deployment import Deployment
from engine.config import Role
from engine.protocol.identity import InstanceId, MessagerId

P0, P1 = InstanceId(Role.PREFILL, 0), InstanceId(Role.PREFILL, 1)
D0, D1 = InstanceId(Role.DECODE, 0), InstanceId(Role.DECODE, 1)


def deployment(elastic: bool) -> Deployment:
    config = parse_config(
        {"prefill": {"instances": 2}, "decode": {"instances": 2}, "elastic": {"enabled": elastic}}
    )
    dep = Deployment(config, prefills={0: "p0", 1: "p1"}, decodes={0: "d0", 1: "d1"})
    serving = {P0: "decode", P1: "prefill", D0: "decode", D1: "prefill"}  # two switched
    dep.infos = {n: {"name": n, "role": r, "inbox": f"tcp://{n}"} for n, r in serving.items()}
    return dep


def test_decode_list_is_the_roles_served_now() -> None:
    dep = deployment(elastic=True)
    assert [info["name"] for info in dep.decode_infos] == [D0, P0]
    dep.refresh_endpoints()
    assert {e["name"]: e["role"] for e in dep.router_endpoints()}[D1] == "prefill"


def test_any_switchable_instance_may_decode_only_with_elastic() -> None:
    elastic, fixed = deployment(elastic=True), deployment(elastic=False)
    assert elastic.may_decode(P0) and elastic.may_decode(D1)
    assert set(elastic.may_prefill()) == {P0, P1, D0, D1}
    assert not fixed.may_decode(P0) and fixed.may_decode(D1)
    assert fixed.may_prefill() == [P0, P1]


def test_instances_the_controller_adds_and_removes_join_and_leave_the_deployment() -> None:
    dep = deployment(elastic=True)
    p2, d2 = InstanceId(Role.PREFILL, 2), InstanceId(Role.DECODE, 2)
    members = [
        {
            "name": p2,
            "actor": "p2",
            "info": {"name": p2, "role": "prefill", "inbox": "tcp://p2"},
            "messager": "m2",
            "messager_info": {"name": MessagerId(2), "inbox": "tcp://m2"},
            "spare": None,
        },
        {
            "name": d2,
            "actor": "d2",
            "info": {"name": d2, "role": "decode", "inbox": "tcp://d2"},
            "messager": None,
            "messager_info": None,
            "spare": "s2",
        },
    ]
    assert dep.sync_added(members) == ([d2, p2], [])
    assert dep.sync_added(members) == ([], [])  # nothing new
    assert {p2, d2, MessagerId(2)} <= set(dep.workers())
    assert dep.actor(MessagerId(2)) == "m2" and dep.spare_messagers[2] == "s2"
    assert [i["name"] for i in dep.decode_infos] == [D0, d2, P0]
    assert {e["name"] for e in dep.router_endpoints()} == {P0, P1, D0, D1, p2, d2}
    assert dep.sync_added(members[1:]) == ([], [p2])  # removed by the controller
    assert p2 not in dep.workers() and MessagerId(2) not in dep.workers()
    assert p2 not in {e["name"] for e in dep.router_endpoints()}
    assert dep.sync_added([]) == ([], [d2]) and 2 not in dep.spare_messagers
    assert dep.workers() == deployment(elastic=True).workers()
