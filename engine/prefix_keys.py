"""Prefix-cache keys: the name of a full KV block, a SHA-256 digest of everything before it.

    key(block 0) = SHA-256(root(cache_salt) || tokens of block 0)
    key(block i) = SHA-256(key(block i-1)   || tokens of block i)
    root(salt)   = SHA-256("pdserve prefix-cache v1" || 0x00 || UTF-8 salt)   (no salt: "")

Token ids enter as little-endian signed 64-bit integers, so every input has one encoding and
the key is the same in every process and on every machine (no `hash()`, no PYTHONHASHSEED):
prefill and decode instances and the routers' prefix index compute identical keys.

Why a cryptographic hash: a cache hit hands a request KV that was computed for someone else's
tokens, and the tokens are never compared. With a 64-bit non-cryptographic hash (the old
`hash((parent, tokens))`) a prompt can be crafted whose block key equals another prompt's, and
would then be served that prompt's KV (vLLM's CVE-2025-25183). Finding two inputs with one
SHA-256 digest is out of reach (2^128 work), so equal keys mean equal token prefixes. A
`cache_salt` goes into the root, so requests with different salts (tenants) share no key, not
even for identical prompts: one tenant cannot learn from cache timing what another sent.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from functools import lru_cache

BlockKey = bytes  # a 32-byte digest
_DOMAIN = b"pdserve prefix-cache v1\x00"


@lru_cache(maxsize=1024)
def root_key(cache_salt: str | None = None) -> BlockKey:
    """The key the first block chains from: one per salt (no salt: the shared root)."""
    return hashlib.sha256(_DOMAIN + (cache_salt or "").encode("utf-8")).digest()


@lru_cache(maxsize=64)
def _packer(num_tokens: int) -> struct.Struct:
    return struct.Struct(f"<{num_tokens}q")


def chain_key(parent: BlockKey, token_ids: Sequence[int]) -> BlockKey:
    """Key of a full block, given the key of the block before it (or a root)."""
    digest = hashlib.sha256(parent)
    digest.update(_packer(len(token_ids)).pack(*token_ids))
    return digest.digest()


def extend_keys(
    keys: list[BlockKey],
    new_token_ids: Sequence[int],
    block_size: int,
    cache_salt: str | None = None,
) -> list[BlockKey]:
    """Append to `keys` (the keys of a sequence's first len(keys) blocks) those of the full
    blocks of `new_token_ids`, the tokens that follow those blocks; returns `keys`. Each block
    is hashed once however often a request's keys are asked for, by keeping `keys` with the
    request, and only the new tokens are read, so the cost does not grow with the context."""
    parent = keys[-1] if keys else root_key(cache_salt)
    for start in range(0, len(new_token_ids) - block_size + 1, block_size):
        parent = chain_key(parent, new_token_ids[start : start + block_size])
        keys.append(parent)
    return keys


def prefix_keys(
    token_ids: Sequence[int], block_size: int, cache_salt: str | None = None
) -> list[BlockKey]:
    """Keys of every full block of `token_ids`."""
    return extend_keys([], token_ids, block_size, cache_salt)
