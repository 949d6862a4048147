"""Prompt weighting as AUTOMATIC1111 users write it: ``(word:1.3)``, ``(word)``, ``[word]``, ``BREAK``.

- ``(text)`` multiplies the attention to ``text`` by 1.1, ``[text]`` divides it by 1.1; they nest.
- ``(text:1.3)`` sets the multiplier (a number after the last colon of the group); ``(text:0.5)`` weakens.
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters; an unclosed group runs to the end.
- ``BREAK`` (upper case, a word of its own) ends the current 75-token chunk: what follows starts a new one.

``parse_prompt`` turns a prompt into ``(text, weight)`` fragments (``BREAK`` is a fragment of weight
``BREAK_WEIGHT``); the text encoder tokenizes each fragment, multiplies each token's hidden state by its weight
and rescales each chunk to its original mean, as A1111 does. A prompt without any of this syntax is one fragment
of weight 1 and is encoded exactly as before.
"""

from __future__ import annotations

import re

ROUND_UP = 1.1  # the multiplier of one pair of parentheses
BREAK_WEIGHT = -1.0  # marks a BREAK fragment

_TOKENS = re.compile(
    r"""
    \\[\\()\[\]]          # an escaped bracket or backslash
    | \(                  # open a stronger group
    | \[                  # open a weaker group
    | :\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)   # ':1.3)': close a group with an explicit weight
    | \)                  # close a stronger group
    | \]                  # close a weaker group
    | [^\\()\[\]:]+       # plain text
    | :                   # a colon that gives no weight
    | \\                  # a lone backslash
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt(text: str) -> list[tuple[str, float]]:
    """``text`` as ``(fragment, weight)`` pairs, adjacent fragments of equal weight merged; ``[("", 1.0)]`` for
    an empty prompt."""
    fragments: list[list[str | float]] = []
    round_open: list[int] = []  # indices into fragments where each open group starts
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] = float(fragment[1]) * factor

    for match in _TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            fragments.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND_UP)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / ROUND_UP)
        else:  # text (a stray closing bracket or weight stays text, as in A1111)
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    fragments.append(["BREAK", BREAK_WEIGHT])
                if part:
                    fragments.append([part, 1.0])
    for start in round_open:  # unclosed groups run to the end
        scale(start, ROUND_UP)
    for start in square_open:
        scale(start, 1 / ROUND_UP)

    merged: list[tuple[str, float]] = []
    for fragment_text, fragment_weight in fragments:
        part, w = str(fragment_text), float(fragment_weight)
        if merged and merged[-1][1] == w and w != BREAK_WEIGHT:
            merged[-1] = (merged[-1][0] + part, w)
        else:
            merged.append((part, w))
    return merged or [("", 1.0)]


def is_plain(fragments: list[tuple[str, float]]) -> bool:
    """No weighting and no BREAK: the prompt encodes as its text alone."""
    return all(weight == 1.0 for _, weight in fragments)
