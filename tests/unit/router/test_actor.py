"""RouterActor as the launcher uses it, minus Ray: a plain object with fake instance handles."""

from __future__ import annotations

from concurrent.futures import Future

import httpx

from cluster.router.actor import RouterActor
from tests.unit.router.fakes import expected_text, make_byte_tokenizer


class _FakeRef:
    def __init__(self, value: bool) -> None:
        self._value = value

    def future(self) -> Future:
        done: Future = Future()
        done.set_result(self._value)
        return done


class _FakeHandle:
    """Stands in for a Ray actor handle: `handle.is_ready.remote()` gives an ObjectRef."""

    def __init__(self, ready: bool) -> None:
        self.ready = ready
        self.is_ready = self

    def remote(self) -> _FakeRef:
        return _FakeRef(self.ready)


def test_actor_serves_and_reports(pd_pair, tmp_path) -> None:
    folder = tmp_path / "TinyModel"
    make_byte_tokenizer(folder)
    instances = [fake.start() for fake in pd_pair()]
    handles = [_FakeHandle(True), _FakeHandle(False)]
    config = {"router": {"host": "127.0.0.1", "port": 0}}
    actor = RouterActor(config, str(folder), "127.0.0.1", max_model_len=128)
    try:
        url = actor.start([f.endpoint for f in instances], health_actor_handles=handles)
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/health").status_code == 503  # one instance is not ready
            handles[1].ready = True
            assert http.get("/health").status_code == 200
            assert http.get("/v1/models").json()["data"][0]["id"] == "TinyModel"
            # /version says what the deployment runs, for `pdserve bench` to print.
            deployment = http.get("/version").json()["deployment"]
            assert deployment["model"] == "TinyModel" and deployment["transfer"] == "nixl"
            assert deployment["topology"] == "1P1D"
            assert deployment["instances"] == {"prefill": 1, "decode": 1, "mixed": 0}
            body = {"model": "TinyModel", "prompt": "hi", "max_tokens": 4}
            response = http.post("/v1/completions", json=body).json()
        assert response["choices"][0]["text"] == expected_text(4)
        stats = actor.stats()
        assert stats["running"] and stats["inflight_requests"] == 0
        assert stats["outstanding_prefill_tokens"] == {"prefill-0": 0}
        assert stats["bad_frames"] == 0
    finally:
        actor.stop()
        for fake in instances:
            fake.stop()
    assert actor.stats() == {"running": False}
