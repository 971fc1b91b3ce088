"""Splitting requests over a pool of actors: near-equal contiguous shares."""

from __future__ import annotations

import pytest

from nemo_rl.distributed.sharding import split_evenly


@pytest.mark.parametrize(("count", "parts"), [(0, 1), (1, 1), (10, 3), (10, 5), (7, 4), (16, 3), (3, 3), (100, 7)])
def test_shares_are_near_equal_and_restore_order(count, parts):
    items = list(range(count))
    shares = split_evenly(items, parts)
    assert len(shares) == parts
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first shares take the remainder
    assert [x for share in shares for x in share] == items


def test_hand_example():
    assert split_evenly(list("abcdefg"), 3) == [list("abc"), list("de"), list("fg")]


def test_more_parts_than_items_leaves_empty_shares_at_the_end():
    shares = split_evenly(["a", "b"], 5)
    assert shares == [["a"], ["b"], [], [], []]


def test_works_on_any_sequence_type():
    assert split_evenly("abcde", 2) == ["abc", "de"]
    assert split_evenly((1, 2, 3), 2) == [(1, 2), (3,)]
