"""Checks `pdserve` runs before Ray starts, so a start-up failure is one line naming its cause.

What can be known on the deploying machine is checked here: the model folder (config.json of a
supported architecture, weights, tokenizer), the router's port (in range, free), with an
embedded Ray the GPUs the config asks for against those present, and when joining a cluster
that its address answers (`pdserve status` uses the same check). What only the cluster knows
(room on other nodes, a port taken after this check) fails later, in the launcher and the
router, as a `PdserveError` too; `one_line` turns any of them, raised here or inside a Ray
actor, into the single line the CLI prints.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from cluster.config import PdserveConfig, RouterPlacement
from engine.errors import ConfigError, DeployError, PdserveError

PORT_MAX = 65535
RAY_CONNECT_TIMEOUT_S = 10.0  # a cluster to join must accept a connection within this


def apply_port(config: PdserveConfig, port: int | None) -> None:
    """`--port`, as `router.port`; out of range is a ConfigError naming the option."""
    if port is None:
        return
    if not 0 <= port <= PORT_MAX:
        raise ConfigError(f"--port {port}: must be in 0..{PORT_MAX} (0: pick a free port)")
    config.router.port = port


def check_serve(config: PdserveConfig, address: str | None = None) -> None:
    """Everything about `config` that can fail before Ray starts; raises PdserveError."""
    embedded = not (address or config.cluster.address)
    check_model(config)
    if embedded or config.router.placement is RouterPlacement.DRIVER_NODE:
        check_port_free(config.router.host, config.router.port)
    if embedded:
        check_gpus(config, _gpus_present())
    else:
        check_ray_reachable(address or config.cluster.address, RAY_CONNECT_TIMEOUT_S)


def check_model(config: PdserveConfig) -> Path:
    """The model folder can be served: config.json of a supported model, weights, tokenizer."""
    from worker.engine_core import resolve_model_path
    from worker.model_config import load_model_config

    folder = resolve_model_path(config.model)  # converts the default model once, if needed
    load_model_config(folder)  # ModelLoadError: no folder, no config.json, unsupported model
    if config.model.load_format == "safetensors" and not (
        (folder / "model.safetensors").is_file()
        or (folder / "model.safetensors.index.json").is_file()
    ):
        raise ConfigError(
            f"model.path: no model.safetensors or model.safetensors.index.json in {folder} "
            "(model.load_format: random serves its config.json with random weights)"
        )
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"model.path: no tokenizer.json in {folder}")
    return folder


def check_port_free(host: str, port: int) -> None:
    """The router can listen on host:port (port 0 always can); the probe lets go at once."""
    if port != 0:
        listen_socket(host, port).close()


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port as uvicorn binds one (SO_REUSEADDR, so a port in TIME_WAIT
    counts as free); a PdserveError naming the cause when it cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"router.host {host!r}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise bind_error(host, port, exc) from None
    return sock


def bind_error(host: str, port: int, exc: OSError) -> PdserveError:
    """The one-line error for a failed bind of the router's socket."""
    if exc.errno == errno.EADDRINUSE:
        return DeployError(
            f"router.port {port}: {host}:{port} is already in use; stop what listens there or "
            "pick another port (--port, 0 for any free one)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"router.host {host!r}: not an address of this machine")
    if exc.errno == errno.EACCES:
        return ConfigError(f"router.port {port}: permission denied (ports below 1024 need root)")
    return DeployError(f"router cannot listen on {host}:{port}: {exc.strerror or exc}")


def ray_bootstrap_address(address: str | None) -> str | None:
    """The GCS host:port that `ray.init(address=...)` would join, or None where that cannot be
    known before joining (a Ray Client `ray://` address). "auto" finds the running local cluster
    as Ray does; none found is a DeployError."""
    if address and "://" in address:
        return None
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        return canonicalize_bootstrap_address_or_die(address or "auto")
    except (ConnectionError, ValueError) as exc:
        raise DeployError(f"no Ray cluster at {address or 'auto'}: {_first_line(exc)}") from None


def check_ray_reachable(address: str | None, timeout_s: float) -> None:
    """Ray's GCS at `address` accepts a TCP connection within timeout_s. Without this check,
    joining an address where nothing listens retries for minutes (Ray's own back-off)."""
    bootstrap = ray_bootstrap_address(address)
    if bootstrap is None:
        return
    host, _, port = bootstrap.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except TimeoutError:
        raise DeployError(
            f"no Ray cluster at {address} ({bootstrap}): no answer within {timeout_s:g} s"
        ) from None
    except OSError as exc:
        raise DeployError(
            f"no Ray cluster at {address} ({bootstrap}): {exc.strerror or exc}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_gpus(config: PdserveConfig, present: int) -> None:
    """An embedded Ray has this machine's GPUs only: the config must fit in them (the config
    already requires placement.num_gpus > 0 for model.device cuda)."""
    roles = {"prefill": config.prefill, "decode": config.decode, "mixed": config.mixed}
    asked = {
        name: (section.instances, section.placement.num_gpus)
        for name, section in roles.items()
        if section.instances and section.placement.num_gpus
    }
    total = sum(count * gpus for count, gpus in asked.values())
    if total > present:
        parts = ", ".join(f"{n} x {g:g} ({name})" for name, (n, g) in asked.items())
        raise DeployError(
            f"the config asks for {total:g} GPUs ({parts}) but this machine has {present}; "
            "lower the instances or placement.num_gpus, or join a cluster with --address"
        )


def _gpus_present() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def one_line(exc: BaseException) -> str | None:
    """The user-facing line for `exc` (also when Ray wrapped it as a remote task's error), or
    None when it is not an error the user caused."""
    cause = getattr(exc, "cause", None)  # RayTaskError / RayActorError keep the original here
    if isinstance(cause, PdserveError):
        exc = cause
    if not isinstance(exc, PdserveError):
        return None
    return _first_line(exc)
