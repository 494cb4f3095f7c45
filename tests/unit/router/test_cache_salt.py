"""`cache_salt` (vLLM's parameter) in both endpoints: validated, and sent on with the request."""

from __future__ import annotations

import pytest

_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
_COMPLETION = {"prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize(
    "path,body", [("/v1/completions", _COMPLETION), ("/v1/chat/completions", _CHAT)]
)
def test_cache_salt_reaches_the_instances(start_router, pd_pair, path, body) -> None:
    router = start_router(pd_pair())
    prefill = router.fakes[0]
    with router.http() as http:
        assert http.post(path, json={**body, "cache_salt": "tenant-a"}).status_code == 200
        assert http.post(path, json=body).status_code == 200
    first, second = prefill.wait_received(2)
    assert first.sampling.cache_salt == "tenant-a"
    assert second.sampling.cache_salt is None
    router.assert_no_leaks()


@pytest.mark.parametrize(
    "path,body", [("/v1/completions", _COMPLETION), ("/v1/chat/completions", _CHAT)]
)
@pytest.mark.parametrize("salt", ["", 42, ["a"], {"a": 1}])
def test_a_bad_cache_salt_is_a_400_naming_it(start_router, pd_pair, path, body, salt) -> None:
    router = start_router(pd_pair())
    with router.http() as http:
        response = http.post(path, json={**body, "cache_salt": salt})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "cache_salt" and "cache_salt" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert router.fakes[0].received == []
