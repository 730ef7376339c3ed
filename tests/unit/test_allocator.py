"""The CUDA allocator setting `kubetune train` makes before torch allocates (trainer/allocator.py)."""

from __future__ import annotations

from kubetune.trainer.allocator import EXPANDABLE, VARIABLE, use_expandable_segments


def test_unset_gets_expandable_segments():
    env: dict[str, str] = {}
    assert use_expandable_segments(env) == EXPANDABLE == env[VARIABLE]


def test_other_options_are_kept():
    env = {VARIABLE: "max_split_size_mb:512"}
    assert use_expandable_segments(env) == "max_split_size_mb:512,expandable_segments:True"


def test_an_explicit_choice_wins_either_way():
    for value in ("expandable_segments:False", "garbage_collection_threshold:0.8,expandable_segments:True"):
        env = {VARIABLE: value}
        assert use_expandable_segments(env) == value and env[VARIABLE] == value
