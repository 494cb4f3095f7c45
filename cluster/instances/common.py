"""Where an instance binds, and what names its shared memory."""

from __future__ import annotations

import hashlib
import os

from cluster.config import PdserveConfig
from engine.protocol.channels import node_ip_address


def advertised_host(config: PdserveConfig) -> str:
    """Address this actor binds and advertises: the configured one for an embedded local Ray
    (loopback by default, so nothing leaves the machine), the node's own address in a cluster."""
    if config.cluster.address is None:
        return config.cluster.node_ip
    return node_ip_address()


def deployment_id() -> str:
    """Same for this actor and its restarts, different for another deployment on the node (so
    one never unlinks the other's shared memory): the Ray job that created the actor, within
    its Ray cluster. Every fresh local Ray numbers its first job 01000000, so two clusters on
    one host (two `pdserve serve`, or test runs side by side) differ only by their GCS."""
    import ray

    if not ray.is_initialized():  # not under Ray (tests that build the instance directly)
        return f"p{os.getpid()}"
    context = ray.get_runtime_context()
    cluster = hashlib.sha256(str(context.gcs_address).encode()).hexdigest()[:8]
    return f"{context.get_job_id()}{cluster}"
