"""Prefix-cache keys: cryptographic, salted, the same in every process, hashed once per block."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import pytest

from engine import prefix_keys
from engine.block_manager import BlockManager
from engine.config import Role
from engine.prefix_keys import chain_key
from engine.prefix_keys import prefix_keys as keys_of
from engine.protocol import codec
from engine.sampling_params import SamplingParams, SamplingParamsError
from tests.unit.engine.helpers import assert_nothing_leaked, make_request, make_scheduler

BS = 4


def _old_chain_key(parent, token_ids) -> int:
    """The key function before SHA-256, verbatim: Python's 64-bit tuple hash."""
    return hash((parent, tuple(token_ids)))


def _colliding_blocks() -> tuple[list[int], list[int]]:
    """Two different blocks with the same old key. Python hashes an int modulo
    sys.hash_info.modulus (2^61 - 1 on 64-bit builds), so n and n + modulus hash alike, and so
    do the tuples holding them: a crafted 'token' reaches another prompt's key in closed form."""
    victim = [101, 7592, 2088, 999]
    crafted = [101, 7592, 2088, 999 + sys.hash_info.modulus]
    return victim, crafted


def _cached_then_lookup(
    manager: BlockManager, first: list[int], second: list[int], salts=(None, None)
):
    """Cache `first` (computed, committed, freed), then allocate `second`: the blocks it shares."""
    owner = make_request("owner", first, cache_salt=salts[0])
    manager.allocate(owner, len(first))
    owner.num_computed_tokens = len(first)
    manager.commit_full_blocks(owner)
    manager.free(owner)
    other = make_request("other", second, cache_salt=salts[1])
    manager.allocate(other, len(second))
    shared = other.num_cached_tokens // BS
    manager.free(other)
    manager.check_invariants([])
    return shared


def test_old_keys_collide_and_shared_kv_across_prompts_new_keys_do_not(monkeypatch) -> None:
    victim, crafted = _colliding_blocks()
    assert victim != crafted
    parent = 0x9E3779B97F4A7C15  # the old root
    assert _old_chain_key(parent, victim) == _old_chain_key(parent, crafted)  # a real collision
    tail = [5, 6, 7, 8, 9]  # a second block and a token to compute, so block 0 is matchable

    # A copy of the old scheme, to show what the collision did: the crafted prompt was served
    # the victim's block (its KV) as a prefix hit.
    with monkeypatch.context() as patched:
        patched.setattr(prefix_keys, "chain_key", _old_chain_key)
        # Both blocks: once a key collides, every later block chains from the same parent.
        assert _cached_then_lookup(BlockManager(16, BS), victim + tail, crafted + tail) == 2

    # The real keys: different tokens, different keys, no shared block.
    assert chain_key(prefix_keys.root_key(), victim) != chain_key(prefix_keys.root_key(), crafted)
    assert _cached_then_lookup(BlockManager(16, BS), victim + tail, crafted + tail) == 0
    assert _cached_then_lookup(BlockManager(16, BS), victim + tail, victim + tail) == 2


def test_salts_separate_tenants_and_the_same_salt_shares() -> None:
    prompt = list(range(100, 109))  # two full blocks and one token to compute
    assert _cached_then_lookup(BlockManager(16, BS), prompt, prompt, ("tenant-a", "tenant-b")) == 0
    assert _cached_then_lookup(BlockManager(16, BS), prompt, prompt, ("tenant-a", None)) == 0
    assert _cached_then_lookup(BlockManager(16, BS), prompt, prompt, (None, "tenant-a")) == 0
    assert _cached_then_lookup(BlockManager(16, BS), prompt, prompt, ("tenant-a", "tenant-a")) == 2
    assert _cached_then_lookup(BlockManager(16, BS), prompt, prompt, (None, None)) == 2
    # The salt is in the root, so every block's key differs, not just the first one's.
    salted, plain = keys_of(prompt, BS, "tenant-a"), keys_of(prompt, BS)
    assert not set(salted) & set(plain)


def test_remote_kv_on_decode_matches_under_the_same_salt_only() -> None:
    """D's allocate_remote (KV written from P) finds P-side keys: the same function, same salt."""
    manager = BlockManager(16, BS)
    prompt = list(range(8))
    owner = make_request("owner", prompt, cache_salt="t1")
    manager.allocate(owner, 8)
    owner.num_computed_tokens = 8
    manager.commit_full_blocks(owner)
    for salt, expected in (("t2", 0), (None, 0), ("t1", 2)):
        blocks, cached = manager.allocate_remote(prompt, 9, cache_salt=salt)
        assert cached == expected
        manager.free_blocks(blocks)
    manager.free(owner)
    manager.check_invariants([])


def test_keys_are_the_specified_digest_in_any_process() -> None:
    root = hashlib.sha256(b"pdserve prefix-cache v1\x00" + "salt-é".encode()).digest()
    first = hashlib.sha256(root + struct.pack("<4q", 1, 2, 3, 4)).digest()
    second = hashlib.sha256(first + struct.pack("<4q", 5, 6, 7, 2**40)).digest()
    tokens = [1, 2, 3, 4, 5, 6, 7, 2**40, 9]
    assert keys_of(tokens, BS, "salt-é") == [first, second]
    code = (
        "from engine.prefix_keys import prefix_keys; "
        f"print(prefix_keys({tokens}, {BS}, 'salt-é')[-1].hex())"
    )
    for seed in ("0", "4242"):  # str and bytes hashes change with it; the keys must not
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == second.hex()


def test_each_block_is_hashed_once_per_request(monkeypatch) -> None:
    calls = []
    real = prefix_keys.chain_key
    monkeypatch.setattr(prefix_keys, "chain_key", lambda p, t: calls.append(1) or real(p, t))
    manager = BlockManager(16, BS)
    request = make_request("r", list(range(13)))  # 3 full blocks + 1
    assert manager.can_allocate(request, 13)
    manager.allocate(request, 13)  # looked up twice (can_allocate, allocate): hashed once
    request.num_computed_tokens = 13
    manager.commit_full_blocks(request)  # published: not hashed again
    assert len(calls) == 3
    for token in (20, 21, 22):  # decode fills the fourth block
        request.output_token_ids.append(token)
        manager.allocate(request, request.num_tokens)
        request.num_computed_tokens = request.num_tokens
        manager.commit_full_blocks(request)
    assert len(calls) == 4
    assert request.block_keys == keys_of(request.all_token_ids, BS)
    manager.free(request)


def test_keying_a_filled_block_reads_only_its_tokens(monkeypatch) -> None:
    """Decode publishes a block every block_size tokens: that costs the same at any context."""
    manager = BlockManager(64, BS)
    request = make_request("r", list(range(1, 41)))  # a long prompt: 10 full blocks
    manager.allocate(request, 40)
    request.num_computed_tokens = 40
    manager.commit_full_blocks(request)
    read = []
    real_slice = type(request).token_slice
    monkeypatch.setattr(
        type(request), "token_slice", lambda r, a, b: read.append(b - a) or real_slice(r, a, b)
    )
    monkeypatch.setattr(type(request), "all_token_ids", property(lambda r: 1 / 0))
    for token in (50, 51, 52, 53):  # decode fills the eleventh block
        request.output_token_ids.append(token)
        manager.allocate(request, request.num_tokens)
        request.num_computed_tokens = request.num_tokens
        manager.commit_full_blocks(request)
    assert read == [BS]
    assert request.block_keys == keys_of([*range(1, 41), 50, 51, 52, 53], BS)
    manager.free(request)


@pytest.mark.parametrize("salt", ["", 7, ["a"]])
def test_cache_salt_must_be_a_non_empty_string(salt) -> None:
    with pytest.raises(SamplingParamsError) as caught:
        SamplingParams(cache_salt=salt)
    assert caught.value.param == "cache_salt"


def test_cache_salt_travels_with_the_sampling_params() -> None:
    params = SamplingParams(temperature=0, cache_salt="tenant-7")
    assert codec.decode(codec.encode(params)).cache_salt == "tenant-7"


def test_decode_reuses_cached_remote_prefix_only_under_the_same_salt() -> None:
    sched = make_scheduler(role=Role.DECODE, num_blocks=16, block_size=BS)
    prompt = list(range(1, 11))
    first = make_request("a", prompt, max_tokens=1, cache_salt="t1")
    assert sched.reserve_remote(first, reuse_prefix=True)
    sched.start_remote("a", 3)  # max_tokens 1: finished, its full prompt blocks stay cached
    for rid, salt, expected in (("b", "t2", 0), ("c", None, 0), ("d", "t1", 8)):
        request = make_request(rid, prompt, max_tokens=1, cache_salt=salt)
        assert sched.reserve_remote(request, reuse_prefix=True)
        assert request.num_cached_tokens == expected, rid
        sched.abort_request(rid)
    assert_nothing_leaked(sched)
