"""Start-up checks before Ray: each failure is one PdserveError line naming its cause."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import preflight
from cluster.config import parse_config
from engine.errors import ConfigError, DeployError, PdserveError

REPO = Path(__file__).resolve().parents[3]


def _listener(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen()
    return sock


def test_port_out_of_range_names_the_option() -> None:
    config = parse_config({})
    with pytest.raises(ConfigError, match=r"--port 99999: must be in 0\.\.65535"):
        preflight.apply_port(config, 99999)
    preflight.apply_port(config, 8123)
    assert config.router.port == 8123


def test_port_in_use_is_one_line_and_a_free_one_passes() -> None:
    with _listener() as taken:
        port = taken.getsockname()[1]
        with pytest.raises(DeployError, match=f"router.port {port}: .* already in use") as info:
            preflight.check_port_free("127.0.0.1", port)
        assert "\n" not in str(info.value)
    preflight.check_port_free("127.0.0.1", port)  # closed now
    preflight.check_port_free("127.0.0.1", 0)


def test_host_that_is_not_ours_is_named() -> None:
    with pytest.raises(ConfigError, match=r"router\.host .192\.0\.2\.55.: not an address"):
        preflight.check_port_free("192.0.2.55", 8000)  # TEST-NET-1: never local


def test_gpus_asked_against_present() -> None:
    config = parse_config({"decode": {"instances": 2, "placement": {"num_gpus": 1}}})
    with pytest.raises(DeployError, match=r"asks for 2 GPUs \(2 x 1 \(decode\)\).* has 1"):
        preflight.check_gpus(config, present=1)
    preflight.check_gpus(config, present=2)
    shared = parse_config(
        {
            "prefill": {"placement": {"num_gpus": 0.5}},
            "decode": {"placement": {"num_gpus": 0.5}},
        }
    )
    preflight.check_gpus(shared, present=1)
    with pytest.raises(DeployError, match=r"asks for 1 GPUs .* has 0"):
        preflight.check_gpus(shared, present=0)


def test_model_folder_checks(tmp_path: Path) -> None:
    missing = parse_config({"model": {"path": str(tmp_path / "nowhere")}})
    with pytest.raises(PdserveError, match="does not exist"):
        preflight.check_model(missing)
    folder = tmp_path / "model"
    folder.mkdir()
    config = parse_config({"model": {"path": str(folder)}})
    with pytest.raises(PdserveError, match=r"no config\.json"):
        preflight.check_model(config)
    arch = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "max_position_embeddings": 128,
    }
    (folder / "config.json").write_text(json.dumps(arch))
    with pytest.raises(ConfigError, match=r"no model\.safetensors"):
        preflight.check_model(config)
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        preflight.check_model(config)
    (folder / "tokenizer.json").write_text("{}")
    assert preflight.check_model(config) == folder


def test_one_line_unwraps_a_remote_cause_and_keeps_the_first_line() -> None:
    class RemoteError(Exception):  # what Ray raises: the original error in `cause`
        def __init__(self, cause: BaseException) -> None:
            super().__init__("ray::RouterActor.start()\nTraceback ...\n" + str(cause))
            self.cause = cause

    wrapped = RemoteError(DeployError("router.port 8000: in use\nmore detail"))
    assert preflight.one_line(wrapped) == "router.port 8000: in use"
    assert preflight.one_line(RemoteError(KeyError("bug"))) is None
    assert preflight.one_line(ValueError("bug")) is None


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _in_process(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`pdserve ARGS` in this process: these fail before anything global is touched, and the
    interpreter start-up a subprocess pays (about 5 s) buys nothing here; the subprocess tests
    below keep the real entry point's stderr covered."""
    from cluster.cli import main

    capfd.readouterr()
    returncode = main(list(args))
    return returncode, capfd.readouterr().err


def _single_error_line(result: subprocess.CompletedProcess[str] | tuple[int, str], cause: str):
    returncode, stderr = (
        (result.returncode, result.stderr)
        if isinstance(result, subprocess.CompletedProcess)
        else result
    )
    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("pdserve: error: ") and cause in lines[0], lines
    return stderr


def test_cli_port_out_of_range(capfd: pytest.CaptureFixture[str]) -> None:
    config = str(REPO / "configs/tiny-1p1d.yaml")
    _single_error_line(_in_process(capfd, "serve", config, "--port", "99999"), "--port 99999")


def test_cli_port_in_use_before_ray_starts() -> None:
    with _listener() as taken:
        port = str(taken.getsockname()[1])
        result = _cli("serve", "configs/tiny-1p1d.yaml", "--port", port)
    _single_error_line(result, f"router.port {port}")
    assert "already in use" in result.stderr


def test_cli_missing_model_folder(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  path: {tmp_path / 'no-such-model'}\n")
    stderr = _single_error_line(_in_process(capfd, "serve", str(config)), "does not exist")
    assert str(tmp_path / "no-such-model") in stderr


def test_cli_more_gpus_than_present(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("decode:\n  placement:\n    num_gpus: 64\n")
    _single_error_line(_in_process(capfd, "serve", str(config)), "asks for 64 GPUs")


def test_cli_generate_empty_prompt(capfd: pytest.CaptureFixture[str]) -> None:
    _single_error_line(_in_process(capfd, "generate", ""), "the prompt is empty")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_address_where_nothing_listens() -> None:
    port = _closed_port()
    with pytest.raises(DeployError, match=f"no Ray cluster at 127.0.0.1:{port}") as info:
        preflight.check_ray_reachable(f"127.0.0.1:{port}", timeout_s=5)
    assert "\n" not in str(info.value)


def test_ray_client_address_is_left_to_ray() -> None:
    assert preflight.ray_bootstrap_address("ray://head:10001") is None


def test_cli_status_where_nothing_listens(capfd: pytest.CaptureFixture[str]) -> None:
    port = _closed_port()
    result = _in_process(capfd, "status", "--address", f"127.0.0.1:{port}", "--timeout", "5")
    _single_error_line(result, f"no Ray cluster at 127.0.0.1:{port}")


def test_cli_status_where_something_else_listens_gives_up_at_its_timeout() -> None:
    # It accepts connections but never speaks Ray's protocol: Ray alone would retry for
    # minutes, printing a warning a second; the CLI stops at --timeout with one line.
    with _listener("0.0.0.0") as other:  # Ray joins 127.0.0.1 at this machine's own address
        port = other.getsockname()[1]
        result = _cli("status", "--address", f"127.0.0.1:{port}", "--timeout", "2")
    _single_error_line(result, "within --timeout 2 s")
