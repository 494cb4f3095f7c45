"""The one YAML config tree of a pdserve deployment, validated with pydantic at load time."""

from __future__ import annotations

import enum
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from cluster.elastic.config import ElasticConfig, SloConfig
from engine.config import EngineConfig, ModelConfig, StrictModel
from engine.errors import ConfigError


class TransferBackendName(str, enum.Enum):
    NIXL = "nixl"
    TCP = "tcp"
    LOCAL = "local"


class RouterPlacement(str, enum.Enum):
    DRIVER_NODE = "driver_node"  # the node `pdserve serve` runs on (the head, after `ray up`)
    ANY = "any"  # wherever Ray finds room


class RoutingMode(str, enum.Enum):
    LOAD = "load"  # fewest outstanding prefill tokens
    CACHE_AWARE = "cache_aware"  # what each instance holds in its prefix cache, and its load


class CacheRoutingConfig(StrictModel):
    max_load_ratio: float = Field(
        2.0,
        ge=1.0,
        description="Balance guard: a cache hit may send a request to an instance only while its "
        "load is at most this times the least loaded instance's load, plus the slack.",
    )
    prefill_slack_tokens: int = Field(
        4096,
        ge=0,
        description="Balance guard slack for prefill (and mixed) instances, in outstanding "
        "prefill tokens.",
    )
    decode_slack_requests: int = Field(
        8, ge=0, description="Balance guard slack for decode instances, in requests in flight."
    )
    index_max_blocks: int = Field(
        1 << 20,
        ge=1,
        description="Most prefix-cache block keys the router remembers per instance (never more "
        "than the instance's KV blocks; the oldest are forgotten first).",
    )


class PlacementConfig(StrictModel):
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per instance (Ray resources).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per instance; fractions share a GPU.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each instance needs, e.g. {prefill_node: 1} to pin "
        "prefill instances to nodes that advertise that resource.",
    )
    label_selector: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels the instance must run on."
    )


class RouterConfig(StrictModel):
    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 to expose).")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: pick a free one).")
    model_name: str | None = Field(None, description="Name served at /v1/models.")
    api_key: str | None = Field(None, description="When set, clients must send this bearer key.")
    first_token_timeout_s: float = Field(
        120.0, gt=0, description="Longest wait for a request's first token."
    )
    next_token_timeout_s: float = Field(
        60.0, gt=0, description="Longest wait between two tokens of a request."
    )
    max_inflight_requests: int = Field(
        1024, ge=1, description="Requests admitted at once; more get 503 with Retry-After."
    )
    max_requests_per_client: int = Field(
        0,
        ge=0,
        description="Requests one client (its API key, else its address) may have in flight; "
        "more get 429 with Retry-After. 0: unlimited.",
    )
    max_n: int = Field(
        8,
        ge=1,
        description="Largest `n` (choices per request); each choice runs as its own request "
        "on the instances.",
    )
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="Largest request body.")
    migrate_on_failure: bool = Field(
        True,
        description="When an instance serving a request dies or ends it with an error (a KV "
        "transfer failed), send it on to other instances as prompt + the tokens streamed so "
        "far, so its stream goes on where it stopped; off: the client gets an error.",
    )
    capacity_wait_s: float = Field(
        45.0,
        ge=0,
        description="How long a stream that has already released tokens (or was moved after a "
        "failure) waits for KV capacity when every decode instance refuses it for lack of free "
        "blocks, sent again with backoff, before the refusal reaches the client; meanwhile new "
        "requests get 503. 0: no wait. The token deadlines still apply.",
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM or SIGINT, how long requests in flight may run to their end "
        "while new ones get 503 and /ready is false; the rest then end with an error.",
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved for the router actor.")
    placement: RouterPlacement = Field(
        RouterPlacement.DRIVER_NODE,
        description="driver_node: the router runs on the node that deploys (so its port is "
        "where `pdserve serve` ran); any: wherever Ray has room.",
    )
    routing: RoutingMode = Field(
        RoutingMode.CACHE_AWARE,
        description="load: the prefill instance with the fewest outstanding prefill tokens; "
        "cache_aware: also the prefix each instance holds (prefill and decode), under the "
        "balance guard of router.cache_routing.",
    )
    cache_routing: CacheRoutingConfig = Field(
        default_factory=CacheRoutingConfig, description="Cache-aware routing's balance guard."
    )


class PrefillConfig(StrictModel):
    instances: int = Field(1, ge=0, description="Number of prefill instances.")
    prepare_threads: int = Field(
        4, ge=1, le=256, description="Threads of the prepare pool (one request each at a time)."
    )
    allocation_timeout_s: float = Field(
        5.0, gt=0, description="How long P waits for a decode instance's allocation reply."
    )
    max_decode_attempts: int = Field(
        3, ge=1, description="Decode instances tried per request before it fails."
    )
    transfer_timeout_s: float = Field(
        30.0, gt=0, description="Longest time from first token to all KV written on D."
    )
    max_backlog_tokens: int = Field(
        2048,
        ge=1,
        description="The prepare pool asks a decode instance for blocks only while fewer prompt "
        "tokens than this wait for prefill here, so D's lease covers a short queue.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Batching and KV.")
    placement: PlacementConfig = Field(default_factory=PlacementConfig, description="Where.")


class DecodeConfig(StrictModel):
    instances: int = Field(1, ge=0, description="Number of decode instances.")
    kv_lease_timeout_s: float = Field(
        60.0, gt=0, description="How long D holds an allocation waiting for its KV."
    )
    overlap_schedule: bool | None = Field(
        None, description="Overlap schedule (execute N, save N-1); default: on for GPU."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Batching and KV.")
    placement: PlacementConfig = Field(default_factory=PlacementConfig, description="Where.")


class MixedConfig(StrictModel):
    instances: int = Field(0, ge=0, description="Colocated (prefill+decode) instances.")
    overlap_schedule: bool | None = Field(
        None,
        description="Overlap schedule (execute N, save N-1) for the colocated batch of prefill "
        "chunks and decode rows; default: on for GPU, off for CPU (there it only costs).",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Batching and KV.")
    placement: PlacementConfig = Field(default_factory=PlacementConfig, description="Where.")


class TransferConfig(StrictModel):
    backend: TransferBackendName = Field(
        TransferBackendName.NIXL,
        description="KV data plane: nixl (UCX), tcp (zmq frames), or local (prefill and decode "
        "instances on one machine: the cache messager maps the decode cache and copies -- "
        "memcpy on CPU, one batched copy kernel on a GPU).",
    )
    cache_task_timeout_s: float = Field(
        10.0, gt=0, description="How long the messager waits for a cache task it has not seen."
    )
    staging_buffer_mb: int = Field(
        64,
        ge=1,
        description="The cache messager's staging ring between prefill and decode instances of "
        "different tensor-parallel sizes (MiB, allocated on the first such write, on the prefill "
        "cache's device): each decode rank's heads are gathered there and written as whole blocks.",
    )


class ClusterConfig(StrictModel):
    address: str | None = Field(
        None, description="Ray address to join ('auto' or host:port); empty: start a local Ray."
    )
    namespace: str = Field("pdserve", description="Ray namespace of the named actors.")
    startup_timeout_s: float = Field(600.0, gt=0, description="Longest wait for actors to start.")
    restart_crashed_actors: bool = Field(
        True, description="Let Ray restart a crashed instance actor; the supervisor re-wires it."
    )
    health_check_interval_s: float = Field(
        1.0, gt=0, description="How often the supervisor checks every instance actor."
    )
    heartbeat_timeout_s: float = Field(
        120.0,
        gt=0,
        description="An instance or cache messager whose loop has not gone round for this long "
        "(stuck in a step or a wait) counts as failed: the supervisor kills it so that Ray "
        "restarts it, and re-wires it. Longer than the slowest step, JIT compilation included.",
    )
    node_ip: str = Field(
        "127.0.0.1",
        description="Node address of an embedded local Ray (what its actors bind and advertise); "
        "ignored when joining a cluster, where each node's own address is used.",
    )
    log_to_driver: bool = Field(
        False,
        description="Print the actors' output (Ray's, NIXL's and the instances' log lines) on "
        "the terminal of `pdserve serve`; otherwise it stays in Ray's log files "
        "(`pdserve serve --verbose` sets this).",
    )

    def advertised_host(self) -> str | None:
        """The address actors bind and advertise: the configured one for an embedded local Ray
        (loopback by default, so nothing leaves the machine); None when joining a cluster,
        where each actor takes its own node's (`node_ip_address()`)."""
        return self.node_ip if self.address is None else None


class PdserveConfig(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig, description="What to serve.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="HTTP front end.")
    prefill: PrefillConfig = Field(default_factory=PrefillConfig, description="P instances.")
    decode: DecodeConfig = Field(default_factory=DecodeConfig, description="D instances.")
    mixed: MixedConfig = Field(default_factory=MixedConfig, description="Colocated instances.")
    transfer: TransferConfig = Field(default_factory=TransferConfig, description="KV transfer.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray cluster.")
    slo: SloConfig = Field(default_factory=SloConfig, description="Latency goals (goodput).")
    elastic: ElasticConfig = Field(
        default_factory=ElasticConfig, description="Role switching and scaling to keep the SLO."
    )

    @model_validator(mode="after")
    def _has_a_serving_path(self) -> PdserveConfig:
        pd = self.prefill.instances > 0 and self.decode.instances > 0
        if not pd and self.mixed.instances == 0:
            raise ValueError(
                "nothing can serve: set prefill.instances and decode.instances >= 1, "
                "or mixed.instances >= 1"
            )
        if (self.prefill.instances > 0) != (self.decode.instances > 0):
            raise ValueError("prefill.instances and decode.instances must both be 0 or both > 0")
        if pd and self.decode.kv_lease_timeout_s < 5.0:
            raise ValueError(
                "decode.kv_lease_timeout_s must be >= 5 s: P stops writing KV 2 s or 20% before "
                "the lease ends, which must leave time for the prefill itself"
            )
        if self.model.device == "cuda":
            self._check_gpus_reserved()
        p_block = self.prefill.engine.scheduler.block_size
        d_block = self.decode.engine.scheduler.block_size
        if pd and p_block != d_block:
            raise ValueError(
                f"prefill.engine.scheduler.block_size ({p_block}) must equal "
                f"decode.engine.scheduler.block_size ({d_block}): KV moves block by block"
            )
        self._check_elastic()
        self._check_tensor_parallel()
        return self

    def _check_tensor_parallel(self) -> None:
        # D's own process registers every rank's cache with its transfer agent; on a GPU it
        # sees only its own device (Ray's CUDA_VISIBLE_DEVICES), so it cannot map rank 1's.
        size = self.decode.engine.tensor_parallel_size
        if self.decode.instances and size > 1 and self.model.device.startswith("cuda"):
            raise ValueError(
                f"decode.engine.tensor_parallel_size {size} with model.device cuda: a "
                "tensor-parallel decode instance is served on CPU only for now (its process "
                "cannot map its other ranks' GPU caches); use prefill TP > decode TP, or mixed"
            )

    def _check_elastic(self) -> None:
        elastic = self.elastic
        if not elastic.enabled:
            return
        for role in ("prefill", "decode"):
            least, have = getattr(elastic, f"min_{role}_instances"), getattr(self, role).instances
            if least > have:
                raise ValueError(
                    f"elastic.min_{role}_instances ({least}) exceeds {role}.instances ({have})"
                )
        if self.prefill.engine.cache != self.decode.engine.cache:
            raise ValueError(
                "elastic.enabled needs prefill.engine.cache equal to decode.engine.cache: an "
                "instance keeps its KV cache when it switches roles"
            )
        p_tp = self.prefill.engine.tensor_parallel_size
        d_tp = self.decode.engine.tensor_parallel_size
        if p_tp != d_tp:
            raise ValueError(
                f"elastic.enabled needs prefill.engine.tensor_parallel_size ({p_tp}) equal to "
                f"decode.engine.tensor_parallel_size ({d_tp}): an instance keeps its ranks when "
                "it switches roles"
            )

    def _check_gpus_reserved(self) -> None:
        # Ray hides every GPU from an actor that reserves none, so it would fail at start-up.
        for role in ("prefill", "decode", "mixed"):
            section = getattr(self, role)
            if section.instances and not section.placement.num_gpus:
                raise ValueError(
                    f"{role}.placement.num_gpus must be > 0 when model.device is cuda "
                    "(0.5 lets two instances share one GPU)"
                )


def load_config(path: str | Path) -> PdserveConfig:
    """Read and validate a YAML file; errors name the offending key (e.g. `prefill.engine.x`)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: object, source: str = "config") -> PdserveConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        return PdserveConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc)}") from None


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{key}: {err['msg']}")
    return "; ".join(parts)
