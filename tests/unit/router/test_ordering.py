"""TokenOrderer: items from P and D in any order, repeated or not, give the output in order."""

from __future__ import annotations

import itertools

from cluster.router.ordering import Finish, TokenOrderer
from engine.protocol.tokens import TokenItem


def _item(
    first: int, tokens: list[int], finish: str | None = None, error: str | None = None
) -> TokenItem:
    return TokenItem("r", first, tokens, finish_reason=finish, error=error)


def _run(items: list[TokenItem]) -> tuple[list[int], TokenOrderer]:
    orderer = TokenOrderer()
    out: list[int] = []
    for item in items:
        out.extend(orderer.add(item))
    return out, orderer


def test_every_arrival_order_gives_the_same_output() -> None:
    items = [_item(0, [10]), _item(1, [11, 12]), _item(3, [13]), _item(4, [14], "length")]
    for order in itertools.permutations(items):
        out, orderer = _run(list(order))
        assert out == [10, 11, 12, 13, 14]
        assert orderer.finished == Finish("length")


def test_duplicates_are_dropped_and_counted() -> None:
    out, orderer = _run(
        [_item(0, [10]), _item(0, [10]), _item(1, [11, 12]), _item(2, [12, 13]), _item(1, [11])]
    )
    assert out == [10, 11, 12, 13]
    assert orderer.duplicates == 3
    assert orderer.finished is None


def test_finish_waits_for_missing_tokens() -> None:
    orderer = TokenOrderer()
    assert orderer.add(_item(2, [12], "stop")) == []
    assert orderer.finished is None
    assert orderer.add(_item(0, [10])) == [10]
    assert orderer.add(_item(1, [11])) == [11, 12]
    assert orderer.finished == Finish("stop")
    assert orderer.add(_item(3, [13])) == []  # after the end: ignored


def test_finish_with_no_tokens_at_the_end() -> None:
    out, orderer = _run([_item(0, [10, 11]), _item(2, [], "stop")])
    assert out == [10, 11] and orderer.finished == Finish("stop")


def test_error_ends_at_once_even_with_gaps() -> None:
    out, orderer = _run([_item(0, [10]), _item(2, [12]), _item(5, [], "error", "KV lost")])
    assert out == [10]
    assert orderer.finished == Finish("error", "KV lost")


def test_tokens_past_a_finish_are_not_shown() -> None:
    out, orderer = _run([_item(0, [10, 11], "length"), _item(2, [12])])
    assert out == [10, 11] and orderer.finished == Finish("length")
