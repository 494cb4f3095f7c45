"""Adding and removing instances: resources asked for, room, minimums, and a removal's order
and roll-back on a stand-in deployment (the Ray path: tests/integration/test_role_switch.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster.config import parse_config
from cluster.elastic import scaling
from cluster.elastic.scaling import (
    AddedInstance,
    InstanceScaler,
    fits,
    minimum_kept,
    resource_bundles,
)
from engine.config import Role
from engine.protocol.identity import InstanceId

P, D = Role.PREFILL, Role.DECODE


def config(**elastic):
    return parse_config(
        {
            "prefill": {
                "placement": {"num_cpus": 1, "num_gpus": 1},
                "engine": {"tensor_parallel_size": 2},
            },
            "decode": {
                "instances": 2,
                "placement": {"num_cpus": 2, "num_gpus": 1},
                "engine": {"tensor_parallel_size": 2},
            },
            "elastic": {"enabled": True, "min_decode_instances": 2, **elastic},
        }
    )


def test_the_request_holds_every_instance_with_its_messager_and_ranks() -> None:
    bundles = resource_bundles(config(), [P, D])
    assert bundles == [
        {"CPU": 1.25, "GPU": 1},  # prefill rank 0 and its messager
        {"CPU": 1, "GPU": 1},  # prefill rank 1
        {"CPU": 2.25, "GPU": 1},  # decode rank 0 and its spare messager (elastic)
        {"CPU": 2, "GPU": 1},  # decode rank 1
    ]
    assert resource_bundles(config(), []) == []


def test_room_is_what_is_free_summed_over_the_cluster() -> None:
    one_decode = resource_bundles(config(), [D])
    assert fits({"CPU": 8, "GPU": 2}, one_decode)
    assert not fits({"CPU": 8, "GPU": 1}, one_decode)
    assert not fits({"CPU": 4, "GPU": 4}, one_decode)
    assert fits({"CPU": 4.25, "GPU": 2, "memory": 1e9}, one_decode)


def test_a_removal_never_goes_under_the_minimum_of_the_role_served_now() -> None:
    serving = {"prefill-0": P, "decode-0": D, "decode-1": D, "decode-2": D, "prefill-1": D}
    assert minimum_kept(config(), serving, "decode-2") is None
    tight = {n: r for n, r in serving.items() if n not in ("decode-2", "prefill-1")}
    assert "the minimum is 2" in minimum_kept(config(), tight, "decode-1")
    assert "the minimum is 1" in minimum_kept(config(), serving, "prefill-0")


class Call:
    """A fake actor method: `.remote(...)` records the call and returns the answer (the fake
    `ray.get` hands it back as it is)."""

    def __init__(self, log: list, name: str, answer=None) -> None:
        self.log, self.name, self.answer = log, name, answer

    def remote(self, *args):
        self.log.append((self.name, args))
        return self.answer


class FakeActor:
    def __init__(self, log: list, name: str, drains: bool = True) -> None:
        outcome = {"switched": drains, "role": "decode", "reason": "did not drain"}
        self.switch_role = Call(log, f"{name}.switch_role", outcome)
        self.decode_down = Call(log, f"{name}.decode_down")


class FakeSwitcher:
    """Every instance's endpoint as `roles` says; announcements recorded."""

    def __init__(self, roles: dict[str, Role], actors: dict) -> None:
        self.roles, self.actors, self.announced, self.messagers = roles, actors, [], {}

    def named(self):
        return dict(self.actors)

    def endpoints(self, actors):
        names = {n: InstanceId(Role(n.split("-")[0]), int(n.split("-")[1])) for n in self.roles}
        return {n: {"name": names[n], "role": r.value} for n, r in self.roles.items()}

    def announce(self, infos, actors, leaving=None):
        self.announced.append(sorted(n for n in infos if n != leaving))

    def own_deadlines_s(self) -> float:
        return 1.0

    def serially(self, fn, *args):
        return fn(*args)


def scaler_with(monkeypatch, drains: bool = True):
    log: list = []
    monkeypatch.setattr(
        scaling,
        "ray",
        SimpleNamespace(
            get=lambda ref, timeout=None: ref,
            kill=lambda actor, no_restart: log.append(("kill", actor)),
        ),
    )
    monkeypatch.setattr(scaling, "request_resources", lambda bundles: log.append(("ask", bundles)))
    roles = {"prefill-0": P, "decode-0": D, "decode-1": D, "decode-2": D}
    actors = {n: FakeActor(log, n, drains) for n in roles} | {"messager-0": FakeActor(log, "m0")}
    switcher = FakeSwitcher(roles, actors)
    scaler = InstanceScaler(
        config(), switcher, watch=lambda handles: log.append(("watch", handles))
    )
    added = AddedInstance(InstanceId(D, 2), actors["decode-2"], spare="spare-2")
    scaler.added["decode-2"] = added
    return scaler, switcher, log


def test_a_removal_drains_tells_the_messagers_and_releases(monkeypatch) -> None:
    scaler, switcher, log = scaler_with(monkeypatch)
    scaler.remove("decode-2")
    assert scaler.added == {} and scaler.members() == []
    assert switcher.announced[0] == ["decode-0", "decode-1", "prefill-0"]  # routed around first
    calls = [c[0] for c in log]
    assert calls.index("decode-2.switch_role") < calls.index("m0.decode_down") < calls.index("kill")
    assert ("kill", "spare-2") in log
    assert [c for c in log if c[0] == "ask"]  # the request lowered


def test_a_removal_that_does_not_drain_is_called_off_and_serves_on(monkeypatch) -> None:
    scaler, switcher, log = scaler_with(monkeypatch, drains=False)
    with pytest.raises(RuntimeError, match="did not drain"):
        scaler.remove("decode-2")
    assert "decode-2" in scaler.added  # the supervisor watches it again
    assert switcher.announced[-1] == ["decode-0", "decode-1", "decode-2", "prefill-0"]
    assert not [c for c in log if c[0] == "kill"]


def test_only_added_instances_are_removed_and_never_under_the_minimum(monkeypatch) -> None:
    scaler, switcher, log = scaler_with(monkeypatch)
    with pytest.raises(ValueError, match="not added by the elastic controller"):
        scaler.remove("decode-0")
    switcher.roles = {"prefill-0": P, "decode-1": D, "decode-2": D}  # min_decode_instances: 2
    with pytest.raises(RuntimeError, match="the minimum is 2"):
        scaler.remove("decode-2")
    assert "decode-2" in scaler.added and switcher.announced == [] and log == []
