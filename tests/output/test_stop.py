"""StopMatcher against the obvious definition (find on the whole text), piece by piece."""

from __future__ import annotations

import random

import pytest

from gptoss_ray.output.stop import StopMatcher


def reference(text: str, stops: list[str]) -> tuple[str, str | None]:
    """The visible text and the stop string that ended it: the earliest-ending match wins,
    as when the text arrives one character at a time; it is cut where that match starts."""
    for end in range(1, len(text) + 1):
        found = [(text.find(s, 0, end), s) for s in stops if text.find(s, 0, end) >= 0]
        if found:
            cut, stop = min(found)
            return text[:cut], stop
    return text, None


def run(pieces: list[str], stops: list[str]) -> tuple[list[str], str | None]:
    m = StopMatcher(stops)
    shown = [m.push(p) for p in pieces]
    shown.append(m.flush())
    assert m.num_released == sum(map(len, shown))
    return shown, m.hit


@pytest.mark.parametrize("seed", range(300))
def test_matches_the_whole_text_find_for_any_split(seed):
    rng = random.Random(seed)
    alphabet = "abS"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 10)))) if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])] if text else []
    shown, hit = run(pieces, stops)
    expected, expected_hit = reference(text, stops)
    assert "".join(shown) == expected and hit == expected_hit


def test_one_character_pieces_cut_at_the_exact_character():
    shown, hit = run(list("xyzSTOPw"), ["STOP"])
    assert "".join(shown) == "xyz" and hit == "STOP"
    assert shown[:3] == ["x", "y", "z"]  # nothing that cannot start "STOP" is held back


def test_prefixes_are_held_back_until_ruled_out():
    m = StopMatcher(["STOP"])
    assert [m.push(c) for c in "aST"] == ["a", "", ""]
    assert m.push("x") == "STx"  # "STx" cannot become "STOP"
    assert m.push("STO") == "" and m.flush() == "STO"  # the end: a prefix that never completed


def test_earliest_match_of_several_wins_and_duplicates_do_not_matter():
    shown, hit = run(["one two", " three"], ["three", "two", "two"])
    assert "".join(shown) == "one " and hit == "two"


def test_a_match_passed_over_before_min_tokens_is_not_found_later():
    m = StopMatcher(["ab"])
    assert m.push("xab", match=False) == "xab"  # "ab" complete, but matching is off
    assert m.push("c") == "c" and m.hit is None
    m = StopMatcher(["ab"])
    assert m.push("xa", match=False) == "x"  # a match that completes once matching is on counts
    assert m.push("b") == "" and m.hit == "ab"


def test_the_window_is_bounded_by_the_longest_stop_string():
    m = StopMatcher(["needle-" * 10, "x"])
    for _ in range(2000):
        m.push("hay " * 5)
    assert len(m._tail) == len("needle-" * 10) - 1  # what every push searches, besides the new piece
