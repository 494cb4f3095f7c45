"""Fixtures of the router tests: a tiny tokenizer, fake instances, routers in front of them."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.config import Role
from engine.tokenizer import Tokenizer
from tests.unit.router.fakes import SCRIPT, FakeInstance, make_byte_tokenizer
from tests.unit.router.harness import RouterStarter


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return make_byte_tokenizer(Path(tmp_path_factory.mktemp("byte-tokenizer")))


@pytest.fixture(scope="session")
def script(byte_tokenizer: Tokenizer) -> list[int]:
    return byte_tokenizer.encode(SCRIPT, add_special_tokens=False)


@pytest.fixture
def pd_pair(script: list[int]):
    """Factory: a fake decode instance and a prefill instance that forwards to it."""

    pairs = itertools.count()  # each pair's index: prefill-i and decode-i

    def make(
        prefix: str = "", prefill: dict | None = None, decode: dict | None = None
    ) -> list[FakeInstance]:
        i = next(pairs)
        d = FakeInstance(f"{prefix}decode", Role.DECODE, script, index=i, **(decode or {}))
        p = FakeInstance(
            f"{prefix}prefill", Role.PREFILL, script, decode_peer=d, index=i, **(prefill or {})
        )
        return [p, d]

    return make


@pytest.fixture
def start_router(byte_tokenizer: Tokenizer) -> Iterator[RouterStarter]:
    """Factory: start fakes and a router in front of them; everything stops after the test."""
    starter = RouterStarter(byte_tokenizer)
    yield starter
    starter.close()
