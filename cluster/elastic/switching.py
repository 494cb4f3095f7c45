"""Carrying out one role switch on a running Ray deployment (the elastic actuator's `switch`).

The instance drains and swaps on its own loop (cluster/instances/switch.py); around that, this
module tells everyone else, in an order that refuses and loses no request:
0. a switch to prefill first makes sure the instance has a cache messager mapping its KV: every
   instance has one from start-up (a prefill instance in its bundle; a decode instance one the
   launcher set up beside it, `start_spare_messagers`, idle while it decodes); one that is gone
   is made again here, and one that cannot start fails the switch before anything changed;
1. the router's endpoints leave the instance out (no new requests for an old prefill, no
   decode hint naming an old decode), and every prefill instance's decode list leaves it out;
2. `switch_role` on the instance: drain (with the deadline `elastic.drain_timeout_s`; decoding
   requests still there move on through the router's migration), swap;
3. re-announce from fresh endpoints: every prefill instance's messager connects to every decode
   instance it does not know yet (never reconnecting one: that would drop writes in flight),
   every prefill instance learns the decode list, a new prefill instance is wired to its
   messager, and the router takes the endpoints with the new role.
A switch the instance calls off (its work did not drain in time) is re-announced in the old
role and reported as failed; nothing was lost. Switches run one at a time, as each one's
announcements are computed from every instance's endpoint as it is then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.config import PdserveConfig
from cluster.messager.launch import messager_actor
from engine.config import Role
from engine.protocol.identity import InstanceId, MessagerId

log = logging.getLogger(__name__)

_CALL_TIMEOUT_S = 15.0


class RoleSwitcher:
    """`named()` gives every named actor of the deployment (the controller aside) by name."""

    def __init__(self, config: PdserveConfig, named: Callable[[], dict[str, Any]]) -> None:
        self.config = config
        self.named = named
        # One thread carries every switch out, in turn (the controller's worker threads and a
        # forced `pdserve switch` queue here): each one's announcements read every instance's
        # endpoint as it is then.
        self._switches = ThreadPoolExecutor(max_workers=1, thread_name_prefix="role-switch")
        # Messagers started here, by name: Ray ends an actor once its owner holds no handle.
        self.messagers: dict[str, Any] = {}

    def switch(self, name: str, role: Role) -> dict:
        """Return the instance's switch outcome once it serves as `role` and everyone knows;
        raise if it could not switch (it then serves in its old role, announced as such)."""
        return self.serially(self._switch, name, role)

    def serially(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the one thread that changes membership (switches, adds,
        removes), after those queued before it; its result."""
        return self._switches.submit(fn, *args).result()

    def _switch(self, name: str, role: Role) -> dict:
        actors = self.named()
        infos = self.endpoints(actors)
        if name not in infos:
            raise ValueError(f"no live instance named {name!r} (have: {sorted(infos)})")
        if Role(infos[name]["role"]) is role:
            return {"switched": True, "role": role.value, "seconds": 0.0, "moved": 0}
        messager = self._messager_for(infos[name], actors) if role is Role.PREFILL else None
        elastic = self.config.elastic
        try:
            self.announce(infos, actors, leaving=name)
            outcome = ray.get(
                actors[name].switch_role.remote(
                    role.value, elastic.drain_timeout_s, self.config.router.migrate_on_failure
                ),
                timeout=elastic.drain_timeout_s + self.own_deadlines_s() + 2 * _CALL_TIMEOUT_S,
            )
            infos[name] = outcome.pop("endpoint")
            if outcome["switched"] and messager is not None:
                self.connect_prefill(actors[name], messager, decodes_of(infos))
                infos[name] = ray.get(actors[name].endpoint.remote(), timeout=_CALL_TIMEOUT_S)
        except Exception:
            # Whatever happened, everyone hears of each instance as it is now (its old role if
            # it never switched; left out if it died: the supervisor's then).
            self.announce(self.endpoints(actors), actors)
            raise
        self.announce(infos, actors)
        if not outcome["switched"]:
            raise RuntimeError(f"{name} stays {outcome['role']}: {outcome['reason']}")
        return outcome

    def own_deadlines_s(self) -> float:
        cfg = self.config
        return cfg.decode.kv_lease_timeout_s + 2 * cfg.prefill.transfer_timeout_s

    # ------------------------------------------------------------------ announcements
    def endpoints(self, actors: dict[str, Any]) -> dict[str, dict]:
        """Every live instance's endpoint as it is now (a dead or stalled one is left out)."""
        instances = {n: a for n, a in actors.items() if _is_instance(n)}
        refs = {n: a.endpoint.remote() for n, a in instances.items()}
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref, timeout=_CALL_TIMEOUT_S)
            except Exception as exc:
                log.warning("elastic: %s has no endpoint now: %s", name, exc)
        return out

    def announce(
        self, infos: dict[str, dict], actors: dict[str, Any], leaving: str | None = None
    ) -> None:
        """Messagers, prefill instances and the router as `infos` say (`leaving` left out, and
        so is a prefill instance without a messager: it could not hand KV over)."""
        kept = {n: i for n, i in infos.items() if n != leaving and i.get("ready", True)}
        decodes = decodes_of(kept)
        prefills = [n for n, i in kept.items() if i["role"] == Role.PREFILL.value]
        for name in prefills:
            messager = actors.get(str(messager_id(infos[name]["name"])))
            if messager is not None:
                call = messager.add_decode_peers.remote(decodes, only_new=True)
                ray.get(call, timeout=self.config.cluster.startup_timeout_s)
        ray.get([actors[n].set_decodes.remote(decodes) for n in prefills], timeout=_CALL_TIMEOUT_S)
        endpoints = [
            {"name": i["name"], "role": i["role"], "inbox": i["inbox"]} for i in kept.values()
        ]
        ray.get(actors["router"].update_endpoints.remote(endpoints), timeout=_CALL_TIMEOUT_S)

    # ------------------------------------------------------------------ a new prefill
    def _messager_for(self, info: dict, actors: dict[str, Any]) -> tuple[Any, str]:
        """The instance's cache messager, set up on its KV cache: (handle, inbox)."""
        mid = messager_id(info["name"])
        timeout = self.config.cluster.startup_timeout_s
        messager = actors.get(str(mid)) or self._start_messager(mid, info)
        # A prefill-born instance's messager is the supervisor's to re-attach after a restart;
        # any other is set up again here (idle: nothing to lose), in case its instance
        # restarted with a new KV cache since.
        born_prefill = info["name"].role is Role.PREFILL
        if born_prefill and ray.get(messager.is_ready.remote(), timeout=_CALL_TIMEOUT_S):
            inbox = ray.get(messager.stats.remote(), timeout=_CALL_TIMEOUT_S)["inbox"]
            return messager, inbox
        setup = messager.setup.remote(info["node_ip"], info["kv_cache"], info["inbox"])
        return messager, ray.get(setup, timeout=timeout)["inbox"]

    def _start_messager(self, mid: MessagerId, info: dict) -> Any:
        handle = start_messager(self.config, mid, info)
        self.messagers[str(mid)] = handle
        return handle

    def connect_prefill(self, actor: Any, messager: tuple[Any, str], decodes: list[dict]):
        handle, inbox = messager
        timeout = self.config.cluster.startup_timeout_s
        ray.get(handle.add_decode_peers.remote(decodes, only_new=True), timeout=timeout)
        ray.get(actor.connect.remote(inbox, decodes), timeout=_CALL_TIMEOUT_S)


def start_messager(config: PdserveConfig, mid: MessagerId, info: dict) -> Any:
    """A cache messager actor for the instance `info` describes, on its node (not set up). The
    caller keeps the handle: Ray ends an actor whose owner holds none."""
    node = info.get("node_id")  # beside its instance: it maps the instance's memory
    strategy = NodeAffinitySchedulingStrategy(node, False) if node else "DEFAULT"
    placement = config.decode.placement.num_gpus or config.prefill.placement.num_gpus
    return messager_actor(config, mid, strategy, bool(placement), get_if_exists=True)


def start_spare_messagers(config: PdserveConfig, decode_infos: list[dict]) -> list[Any]:
    """Elastic: a messager set up on every decode instance's KV from start-up (idle while it
    decodes), so that a switch to prefill starts no process. Returns the handles."""
    handles = [start_messager(config, messager_id(i["name"]), i) for i in decode_infos]
    refs = [
        h.setup.remote(i["node_ip"], i["kv_cache"], i["inbox"])
        for h, i in zip(handles, decode_infos, strict=True)
    ]
    ray.get(refs, timeout=config.cluster.startup_timeout_s)
    return handles


def messager_id(instance: InstanceId) -> MessagerId:
    """The cache messager of an instance (by the role it was born in)."""
    return MessagerId(instance.index, instance.role)


def decodes_of(infos: dict[str, dict]) -> list[dict]:
    return [i for i in infos.values() if i["role"] == Role.DECODE.value]


def _is_instance(name: str) -> bool:
    return name != "router" and not name.startswith("messager-")
