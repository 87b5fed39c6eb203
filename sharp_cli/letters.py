"""The multiple-choice prompt, and the option letter read back from a free-form answer.

Our own format's prompt: the question, one "A. option" line per option, then an instruction to
answer with the letter alone (each benchmark's own prompt is in prompts.py). Models do not always
obey, so `parse_letter` tries, in order of how little it has to guess:

1. the whole answer is a letter, maybe bracketed or punctuated: "B", "(b)", "C.", "**D**";
2. it starts with a letter and a delimiter: "B. red", "(B) red", "b) red", "C: blue";
3. a letter after "answer", "option" or "choice": "The answer is B", "Answer: (c)";
4. it names exactly one option's text: "red", "It moves to the left.";
5. exactly one stand-alone capital letter in range: "I think B is right".

The articles "A" and "a" followed by a word ("A red square", "the answer is a cat") are
never taken for letters. Anything else, or two different letters, gives None: unparsed,
which the runner counts as a wrong answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
PROMPT_VERSION = 1  # stored with every result line: a new prompt must not resume old results

_DECORATION = re.compile(r"[*_`\"“”‘’]+")
_WHOLE = re.compile(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:,;!]?")
_LEADING = re.compile(r"(?:\(\s*([A-Za-z])\s*\)|\[\s*([A-Za-z])\s*\]|([A-Za-z])\s*[.):\]](?=\s|$))")
_KEYWORD = re.compile(
    r"\b(answer|option|choice)\b(?:\s+(?:is|would\s+be|should\s+be|will\s+be|letter\s+is))?"
    r"\s*[:=\-]?\s*[\(\[]?\s*([A-Za-z])(?![\w'])",
    re.IGNORECASE,
)
_CAPITAL = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")
_FOLLOWED_BY_WORD = re.compile(r"\s+[A-Za-z]")
# After these, "A" is still a letter: "A or B", "A is correct".
_NOT_AFTER_ARTICLE = re.compile(
    r"\s+(?:or|and|nor|is|was|seems|looks|fits|matches|because|then|would|should|could|might|must)\b", re.I)
_PREFIX = r"\s*(?:\(\s*{L}\s*\)|\[\s*{L}\s*\]|{L}\s*[.):\]])\s*"


def letter(index: int) -> str:
    return LETTERS[index]


def index(letter_: str) -> int:
    return LETTERS.index(letter_)


def build_prompt(question: str, options: Sequence[str]) -> str:
    """Question, "A. option" lines, then the instruction, one per line."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"a question needs 2 to {len(LETTERS)} options, got {len(options)}")
    lines = [question.strip()]
    lines += [f"{LETTERS[i]}. {' '.join(str(option).split())}" for i, option in enumerate(options)]
    lines.append(INSTRUCTION)
    return "\n".join(lines)


def strip_letter_prefixes(options: Sequence[str]) -> list[str]:
    """["A. red", "B. blue"] -> ["red", "blue"]; options that are not all lettered in order stay as they are."""
    options = [str(o).strip() for o in options]
    stripped = []
    for i, option in enumerate(options):
        match = re.match(_PREFIX.format(L=LETTERS[i]), option, re.IGNORECASE) if i < len(LETTERS) else None
        if match is None or not option[match.end():].strip():
            return options
        stripped.append(option[match.end():].strip())
    return stripped


def parse_letter(text: str | None, options: Sequence[str] | int) -> str | None:
    """The option letter a free-form answer gives, or None when it cannot be told.

    options: the option texts (enables matching by text) or just how many there are.
    """
    count = options if isinstance(options, int) else len(options)
    valid = LETTERS[: max(0, min(count, len(LETTERS)))]
    if not text or not valid:
        return None
    s = " ".join(_DECORATION.sub("", str(text)).split())
    if not s:
        return None

    whole = _WHOLE.fullmatch(s)
    if whole:
        found = whole.group(1).upper()
        return found if found in valid else None

    leading = _LEADING.match(s)
    if leading:
        found = next(g for g in leading.groups() if g).upper()
        if found in valid:
            return found

    found = _after_keyword(s, valid)
    if found:
        return found

    if not isinstance(options, int):
        found = _by_option_text(s, options, valid)
        if found:
            return found

    capitals = {m.group(1) for m in _CAPITAL.finditer(s)
                if m.group(1) in valid and not _is_word(s, m.group(1), m.end())}
    return capitals.pop() if len(capitals) == 1 else None


def _is_word(s: str, found: str, end: int) -> bool:
    """'A' or 'I' used as an English word: followed by another word ("A red square", "I think")."""
    if found not in "AIai" or _FOLLOWED_BY_WORD.match(s, end) is None:
        return False
    return found in "Ii" or _NOT_AFTER_ARTICLE.match(s, end) is None


def _after_keyword(s: str, valid: str) -> str | None:
    """The letter after the last "answer" (else the last "option"/"choice") mention, if valid."""
    best = None
    for m in _KEYWORD.finditer(s):
        raw = m.group(2)
        if raw.islower() and _FOLLOWED_BY_WORD.match(s, m.end(2)):
            continue  # "the answer is a cat": an article, not a letter
        if raw.upper() not in valid:
            continue
        is_answer = m.group(1).lower() == "answer"
        if best is None or is_answer or not best[0]:
            best = (is_answer, raw.upper())
    return best[1] if best else None


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(text).lower()).split())


def _by_option_text(s: str, options: Sequence[str], valid: str) -> str | None:
    """The one option whose text the answer equals or contains (as whole words)."""
    texts = [_normalise(o) for o in options[: len(valid)]]
    if any(not t for t in texts) or len(set(texts)) != len(texts):
        return None  # blank or duplicate options: text cannot tell them apart
    answer = _normalise(s)
    if answer in texts:
        return valid[texts.index(answer)]
    padded = f" {answer} "
    hits = [i for i, t in enumerate(texts) if f" {t} " in padded]
    # "dark red" names "dark red", not also "red": drop hits contained in another hit.
    hits = [i for i in hits if not any(j != i and f" {texts[i]} " in f" {texts[j]} " for j in hits)]
    return valid[hits[0]] if len(hits) == 1 else None
