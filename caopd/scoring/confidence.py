"""Parse, strip and write the verbalized confidence of a completion.

Accepted forms (case-insensitive; the last occurrence in the text wins):
``Confidence: 0.85``, ``confidence: .9``, ``Confidence: 85%``, ``**Confidence:** 0.8``,
``<confidence>0.7</confidence>``. A percentage is divided by 100. A value outside [0, 1] is
clipped and flagged, never silently dropped; text with no confidence parses to ``None``.

Model output is untrusted: this is regex parsing, never evaluation, and every pattern runs in
time linear in the text. Each pattern starts with a literal or at the first character of a run
(a negative look-behind), and no two adjacent quantifiers can match the same character, so the
engine never retries a split of one run of spaces or stars (a run of 10^5 spaces parses in
milliseconds; the patterns this replaced took cubic time on it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))"
_PERCENT = r"(?:[ \t]*(%))?"  # [ \t] ends at the first other character, so the run is scanned once
# "confidence", then one run of spaces and stars, ":" or "=", one more such run, the number.
_INLINE = re.compile(r"\bconfidence[\s*]*[:=][\s*]*" + _NUMBER + _PERCENT, re.IGNORECASE)
_TAGGED = re.compile(r"<confidence>\s*" + _NUMBER + _PERCENT + r"\s*</confidence>", re.IGNORECASE)
# What strip_confidence removes: a whole "Confidence: ..." line (with its leading spaces and stars,
# matched only from the start of their run) and its newline, or a tag pair with what it encloses.
_INLINE_LINE = re.compile(r"(?<![ \t*])[ \t*]*confidence[ \t*]*[:=][^\n]*(?:\n|$)", re.IGNORECASE)
_TAG_OPEN = re.compile(r"(?<![ \t])[ \t]*<confidence>", re.IGNORECASE)
_TAG_CLOSE = re.compile(r"</confidence>", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedConfidence:
    """value: in [0, 1] after clipping; raw: the number as written (after % scaling)."""

    value: float
    raw: float
    clipped: bool


def parse_confidence(text: str) -> ParsedConfidence | None:
    """The last verbalized confidence in ``text``, or None when there is none."""
    last = None
    for pattern in (_INLINE, _TAGGED):
        for match in pattern.finditer(text):
            if last is None or match.start() > last.start():
                last = match
    if last is None:
        return None
    raw = float(last.group(1))  # a digit string of any length: at worst inf, clipped below
    if last.group(2) == "%":
        raw /= 100.0
    value = min(1.0, max(0.0, raw))
    return ParsedConfidence(value=value, raw=raw, clipped=value != raw)


def _strip_tags(text: str) -> str:
    """Remove each ``<confidence>...</confidence>`` span (the first close after each open), one
    left-to-right pass; an open tag that is never closed is kept as text."""
    pieces, position = [], 0
    while (opening := _TAG_OPEN.search(text, position)) is not None:
        closing = _TAG_CLOSE.search(text, opening.end())
        if closing is None:
            break
        pieces.append(text[position:opening.start()])
        position = closing.end()
    pieces.append(text[position:])
    return "".join(pieces)


def strip_confidence(text: str) -> str:
    """``text`` without any confidence statement (lines or tags), trailing space removed."""
    return _INLINE_LINE.sub("", _strip_tags(text)).rstrip()


def format_confidence(value: float) -> str:
    """The canonical confidence line, two decimals: ``Confidence: 0.62``."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"confidence must be in [0, 1], got {value}")
    return f"Confidence: {value:.2f}"
