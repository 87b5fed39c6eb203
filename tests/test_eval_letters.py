"""Eval's letters (sharp_cli/letters.py): reading an option letter back from an answer,
and the multiple-choice prompt."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharp_cli.letters import INSTRUCTION, build_prompt, parse_letter, strip_letter_prefixes

# -- letters ---------------------------------------------------------------------------------------
OPTIONS = ["red", "blue", "dark green", "green"]


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("[C]", "C"), ("**D**", "D"), ("(C", "C"),
    (" B\n", "B"), ("B. blue", "B"), ("b) red", "B"), ("C: dark green", "C"), ("(A) red", "A"),
    ("The answer is B", "B"), ("The answer is (C).", "C"), ("Answer: d", "D"), ("The best answer is: A.", "A"),
    ("option C", "C"), ("I think the correct choice is B.", "B"), ("answer is a", "A"),
    ("blue", "B"), ("Blue.", "B"), ("It is dark green.", "C"), ("green", "D"), ("The square is red", "A"),
    ("I think B is right", "B"), ("A is correct", "A"),
    ("A nice one", None), ("the answer is a cat", None), ("A or B", None), ("green or blue", None),
    ("E", None), ("The answer is E", None), ("", None), ("   ", None), (None, None), ("I am not sure", None),
    ("e.g. nothing", None), ("w424 seven w424", None),
])
def test_parse_letter(text, expected):
    assert parse_letter(text, OPTIONS) == expected


def test_parse_letter_with_a_count_of_options_only():
    assert parse_letter("The answer is C", 4) == "C" and parse_letter("blue", 4) is None
    assert parse_letter("C", 2) is None and parse_letter("B", 2) == "B"


def test_parse_letter_longest_option_text_wins():
    assert parse_letter("dark green", ["green", "dark green", "red"]) == "B"
    assert parse_letter("There are 3 flashes.", ["1", "2", "3", "4"]) == "C"


TEMPLATES = ["{L}", "({L})", "{L}.", "{l}", "**{L}**", "The answer is {L}.", "Answer: ({l})", "{L}. {text}",
             "{l}) {text}", "({L}) {text}", "Option {L}", "The correct answer is {L}, {text}.", "{text}",
             "I think it is {text}."]
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=3, max_size=9)


@settings(max_examples=200, deadline=None)
@given(options=st.lists(words, min_size=2, max_size=8, unique=True), pick=st.integers(0, 7),
       template=st.sampled_from(TEMPLATES))
def test_parse_letter_reads_back_every_template(options, pick, template):
    i = pick % len(options)
    if template.count("{text}") and any(w in ("answer", "option", "choice", "the", "correct") for w in options):
        return  # option texts that are the template's own words are ambiguous by design
    text = template.format(L="ABCDEFGH"[i], l="abcdefgh"[i], text=options[i])
    assert parse_letter(text, options) == "ABCDEFGH"[i]


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80), count=st.integers(0, 30))
def test_parse_letter_never_fails_and_stays_in_range(text, count):
    found = parse_letter(text, count)
    assert found is None or found in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:count]


def test_prompt_layout():
    assert build_prompt(" What colour? ", ["red", "blue"]) == f"What colour?\nA. red\nB. blue\n{INSTRUCTION}"
    assert INSTRUCTION == "Answer with the option's letter from the given choices directly."
    with pytest.raises(ValueError):
        build_prompt("q", ["only one"])


def test_strip_letter_prefixes():
    assert strip_letter_prefixes(["A. red", "B. blue", "(C) green"]) == ["red", "blue", "green"]
    assert strip_letter_prefixes(["A. red", "C. blue"]) == ["A. red", "C. blue"]  # not lettered in order
    assert strip_letter_prefixes(["Apple", "Banana"]) == ["Apple", "Banana"]
