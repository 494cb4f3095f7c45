"""The `slo:` and `elastic:` sections of the YAML config tree (validated with the rest of it in
cluster/config.py, which re-exports both)."""

from __future__ import annotations

from pydantic import Field

from engine.config import StrictModel


class SloConfig(StrictModel):
    """The latency a request must meet to count as served well (goodput)."""

    ttft_ms: float = Field(
        1000.0, gt=0, description="Time to first token a request must meet, in milliseconds."
    )
    tpot_ms: float = Field(
        100.0,
        gt=0,
        description="Mean time per output token after the first a request must meet, in ms.",
    )
    attainment_target: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Fraction of requests that must meet both bounds; below it the elastic "
        "controller counts the SLO as missed.",
    )
    window_s: float = Field(
        30.0, gt=0, description="Requests finished within this many seconds make up attainment."
    )


class ElasticConfig(StrictModel):
    """The controller that switches instances between prefill and decode (and adds or removes
    instances) to keep the SLO; see cluster/elastic/."""

    enabled: bool = Field(False, description="Run the elastic controller.")
    min_prefill_instances: int = Field(
        1, ge=1, description="The controller never leaves fewer prefill instances than this."
    )
    min_decode_instances: int = Field(
        1, ge=1, description="The controller never leaves fewer decode instances than this."
    )
    decision_interval_s: float = Field(
        2.0, gt=0, description="Seconds between two looks at the cluster's state."
    )
    hysteresis: int = Field(
        2,
        ge=1,
        description="Consecutive decisions that must see the same imbalance before the "
        "controller acts on it (one noisy sample never switches an instance).",
    )
    cooldown_s: float = Field(
        10.0,
        ge=0,
        description="After a switch, no other switch for this long, so the effect of the last "
        "one shows in the figures before the next is decided.",
    )
    max_switch_fraction: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Most of one role's instances switched by one decision (at least one).",
    )
    prefill_backlog_high_tokens: int = Field(
        4096,
        ge=1,
        description="Mean prompt tokens queued per prefill instance above which prefill counts "
        "as short of capacity.",
    )
    prefill_busy_high: float = Field(
        0.85,
        gt=0,
        le=1,
        description="Mean busy fraction of prefill instances above which prefill counts as short.",
    )
    decode_load_high: float = Field(
        0.85,
        gt=0,
        le=1,
        description="Mean load of decode instances (the larger of KV use and batch slots in "
        "use) above which decode counts as short, and which a switch away from decode must not "
        "push them over.",
    )
    drain_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest wait for an instance's work in its old role to finish; decoding "
        "requests still running then move to another decode instance.",
    )
    autoscale: bool = Field(
        False,
        description="Add an instance (asking Ray's autoscaler for its resources) when prefill "
        "and decode are both short and the SLO is missed; remove an added one idle for "
        "scale_down_idle_s.",
    )
    max_instances: int = Field(
        0,
        ge=0,
        description="Most instances the controller lets the deployment grow to (0: what the "
        "cluster's resources fit).",
    )
    node_autoscaler: bool = Field(
        False,
        description="The Ray cluster runs Ray's autoscaler, which adds nodes on request: the "
        "controller then adds an instance even when no node has room for it yet (waiting up to "
        "cluster.startup_timeout_s for the node); without it, only where free resources fit one.",
    )
    scale_down_idle_s: float = Field(
        120.0, gt=0, description="An added instance idle this long is removed (autoscale only)."
    )
