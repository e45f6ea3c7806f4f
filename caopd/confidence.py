"""Parse, strip and write the verbalized confidence of a completion.

Accepted forms (case-insensitive; the last occurrence in the text wins):
``Confidence: 0.85``, ``confidence: .9``, ``Confidence: 85%``, ``**Confidence:** 0.8``,
``<confidence>0.7</confidence>``. A percentage is divided by 100. A value outside [0, 1] is
clipped and flagged, never silently dropped; text with no confidence parses to ``None``.
Model output is untrusted: this is regex parsing, never evaluation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*(%?)"
_INLINE = re.compile(r"\bconfidence\s*\**\s*[:=]\s*\**\s*" + _NUMBER, re.IGNORECASE)
_TAGGED = re.compile(r"<confidence>\s*" + _NUMBER + r"\s*</confidence>", re.IGNORECASE)
# What strip_confidence removes: a whole "Confidence: ..." line (or the tag) and its newline.
_INLINE_LINE = re.compile(r"[ \t]*\**[ \t]*confidence[ \t]*\**[ \t]*[:=][^\n]*(?:\n|$)", re.IGNORECASE)
_TAGGED_SPAN = re.compile(r"[ \t]*<confidence>.*?</confidence>", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class ParsedConfidence:
    """value: in [0, 1] after clipping; raw: the number as written (after % scaling)."""

    value: float
    raw: float
    clipped: bool


def parse_confidence(text: str) -> ParsedConfidence | None:
    """The last verbalized confidence in ``text``, or None when there is none."""
    matches = [*_INLINE.finditer(text), *_TAGGED.finditer(text)]
    if not matches:
        return None
    last = max(matches, key=lambda m: m.start())
    raw = float(last.group(1))
    if last.group(2) == "%":
        raw /= 100.0
    value = min(1.0, max(0.0, raw))
    return ParsedConfidence(value=value, raw=raw, clipped=value != raw)


def strip_confidence(text: str) -> str:
    """``text`` without any confidence statement (lines or tags), trailing space removed."""
    text = _TAGGED_SPAN.sub("", text)
    text = _INLINE_LINE.sub("", text)
    return text.rstrip()


def format_confidence(value: float) -> str:
    """The canonical confidence line, two decimals: ``Confidence: 0.62``."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"confidence must be in [0, 1], got {value}")
    return f"Confidence: {value:.2f}"
