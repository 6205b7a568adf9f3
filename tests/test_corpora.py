"""The MiniLM corpora: big enough, clean, and calibration never overlaps evaluation."""

from __future__ import annotations

import re

from fixtures.minilm.model import CALIBRATION_SENTENCES, EVAL_SENTENCES, read_sentences


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def test_sizes_and_uniqueness() -> None:
    evaluation = read_sentences(EVAL_SENTENCES)
    calibration = read_sentences(CALIBRATION_SENTENCES)
    assert len(evaluation) >= 200 and len(calibration) >= 128
    for name, sentences in (("eval", evaluation), ("calibration", calibration)):
        assert len({normalise(s) for s in sentences}) == len(sentences), f"{name} has duplicates"


def test_calibration_and_evaluation_never_overlap() -> None:
    evaluation = {normalise(s) for s in read_sentences(EVAL_SENTENCES)}
    calibration = {normalise(s) for s in read_sentences(CALIBRATION_SENTENCES)}
    assert not evaluation & calibration, sorted(evaluation & calibration)[:5]
