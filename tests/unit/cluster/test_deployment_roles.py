"""With elastic.enabled an instance may serve another role than its name's: the deployment's
decode list and the instances told of a decode instance's death follow the roles served now."""

from __future__ import annotations

from cluster.config import parse_config
from cluster.deployment import Deployment
from engine.config import Role
from engine.protocol.identity import InstanceId

P0, P1 = InstanceId(Role.PREFILL, 0), InstanceId(Role.PREFILL, 1)
D0, D1 = InstanceId(Role.DECODE, 0), InstanceId(Role.DECODE, 1)


def deployment(elastic: bool) -> Deployment:
    config = parse_config(
        {"prefill": {"instances": 2}, "decode": {"instances": 2}, "elastic": {"enabled": elastic}}
    )
    dep = Deployment(config, prefills=["p0", "p1"], decodes=["d0", "d1"])
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
