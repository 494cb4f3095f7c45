"""`pdserve status` shows the controller's last decisions under the instance table."""

from __future__ import annotations

from cluster.cli_status import render
from cluster.config import parse_config
from cluster.elastic.controller import ElasticController
from cluster.elastic.policy import DecisionKind
from engine.config import Role
from tests.unit.elastic.test_controller import Cluster


def test_status_lists_roles_and_the_last_decisions() -> None:
    cluster = Cluster()
    config = parse_config(
        {
            "prefill": {"instances": 2},
            "decode": {"instances": 2},
            "elastic": {"enabled": True, "hysteresis": 1},
        }
    )
    ctl = ElasticController(config, cluster, clock=lambda: cluster.clock)
    ctl.step()
    ctl._pool.shutdown(wait=True)
    ctl.drain_outcomes()
    _, instances = cluster.collect()
    text = render({"url": "http://x", "inflight_requests": 0}, [*instances, ctl.stats()])
    assert "d0           prefill" in text  # the switched instance in its new role
    assert "elastic controller: on, switches done 1, failed 0" in text
    assert "switch d0 decode -> prefill: done in" in text and "prefill is short" in text


def test_status_shows_instances_added_and_removed() -> None:
    cluster = Cluster()
    config = parse_config({"elastic": {"enabled": True}})
    ctl = ElasticController(config, cluster, clock=lambda: cluster.clock)
    ctl.force(DecisionKind.ADD, Role.DECODE, None)
    ctl._pool.shutdown(wait=True)
    ctl.drain_outcomes()
    _, instances = cluster.collect()
    text = render({"url": "http://x", "inflight_requests": 0}, [*instances, ctl.stats()])
    assert "instances added 1, removed 0" in text
    assert "add d4 decode: done in" in text and "forced by an operator" in text
    assert "d4           decode" in text
