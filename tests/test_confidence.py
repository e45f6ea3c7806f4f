import pytest

from caopd.scoring.confidence import format_confidence, parse_confidence, strip_confidence


@pytest.mark.parametrize("text, value", [
    ("Answer: B\nConfidence: 0.85", 0.85),
    ("confidence: .9", 0.9),
    ("Confidence: 85%", 0.85),
    ("Confidence:85 %", 0.85),
    ("<confidence>0.7</confidence>", 0.7),
    ("<Confidence> 40% </Confidence>", 0.4),
    ("**Confidence:** 0.6", 0.6),
    ("CONFIDENCE = 1", 1.0),
    ("Confidence: 0", 0.0),
    ("Confidence: 1.00.", 1.0),
])
def test_parse_formats(text, value):
    parsed = parse_confidence(text)
    assert parsed is not None and parsed.value == pytest.approx(value) and not parsed.clipped


@pytest.mark.parametrize("text, value", [
    ("Confidence: 0.2\n... on reflection\nConfidence: 0.7", 0.7),
    ("<confidence>0.3</confidence> then Confidence: 0.8", 0.8),
    ("Confidence: 0.8 then <confidence>0.3</confidence>", 0.3),
])
def test_last_one_wins(text, value):
    assert parse_confidence(text).value == pytest.approx(value)


@pytest.mark.parametrize("text", ["no number here", "Confidence: high", "", "my confidence is strong",
                                  "<confidence></confidence>"])
def test_missing_is_none(text):
    assert parse_confidence(text) is None


@pytest.mark.parametrize("text, raw, value", [
    ("Confidence: 1.2", 1.2, 1.0), ("Confidence: 85", 85.0, 1.0),
    ("Confidence: -0.3", -0.3, 0.0), ("Confidence: 150%", 1.5, 1.0),
])
def test_out_of_range_is_clipped_and_flagged(text, raw, value):
    parsed = parse_confidence(text)
    assert parsed.clipped and parsed.raw == pytest.approx(raw) and parsed.value == value


def test_strip_removes_every_statement_and_keeps_the_rest():
    text = "Thought: x\nAction: f\nConfidence: 0.9\nmore <confidence>0.2</confidence>\nConfidence: 70%\n"
    stripped = strip_confidence(text)
    assert stripped == "Thought: x\nAction: f\nmore"
    assert parse_confidence(stripped) is None


def test_format_confidence_round_trips():
    assert format_confidence(0.625) == "Confidence: 0.62"  # 0.625 is exact in binary: round half to even
    assert format_confidence(0.0) == "Confidence: 0.00" and format_confidence(1.0) == "Confidence: 1.00"
    assert format_confidence(1 / 3) == "Confidence: 0.33"
    assert parse_confidence(format_confidence(0.875)).value == 0.88
    with pytest.raises(ValueError):
        format_confidence(1.5)


def test_strip_removes_each_tag_pair_once_and_keeps_stray_closers():
    assert strip_confidence("a <confidence>0.2</confidence> b <confidence>0.3</confidence> c") == "a b c"
    assert strip_confidence("a </confidence> b <confidence>0.2</confidence> c") == "a </confidence> b c"


def test_format_confidence_names_the_bad_value():
    with pytest.raises(ValueError, match=r"^confidence must be in \[0, 1\], got -0.5$"):
        format_confidence(-0.5)
