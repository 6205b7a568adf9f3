"""Fuzzing in the suite: every reader of an outside file, fed mutated and generated input.

Default run: a short, derandomized budget per target (``ARROWQUANT_FUZZ_EXAMPLES``,
default 15) plus the regression corpus in ``tests/fuzz/corpus/`` (inputs that once
crashed a reader, kept small). ``make fuzz`` runs the long campaign
(``tests/fuzz/campaign.py``): random seeds, thousands of cases, new crashes saved to the
corpus. A reader may accept an input or refuse it with an ``ArrowQuantError``; any
other exception fails the test (``fuzz.targets``).
"""

from __future__ import annotations

from functools import cache
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st
import pytest

from fuzz import strategies as gen
from fuzz.targets import SEEDS, TARGETS, mutate, run_target

EXAMPLES = int(os.environ.get("ARROWQUANT_FUZZ_EXAMPLES", "15"))
CORPUS = Path(__file__).parent / "fuzz" / "corpus"
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
EDITS = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 1 << 20), st.integers(0, 1 << 16)),
                 min_size=1, max_size=6)


@cache
def seed(target: str) -> bytes:
    return SEEDS[target]()


@pytest.mark.parametrize("target", list(TARGETS))
@FUZZ
@given(edits=EDITS)
def test_mutated_seed_is_accepted_or_a_typed_error(target: str, edits: list[tuple[int, int, int]]) -> None:
    run_target(target, mutate(seed(target), edits))


@FUZZ
@given(data=st.data())
def test_generated_safetensors(data: st.DataObject) -> None:
    run_target("safetensors", gen.safetensors_file(data.draw))


@FUZZ
@given(data=st.data())
def test_generated_criteria(data: st.DataObject) -> None:
    run_target("criteria", gen.criteria_text(data.draw))


@FUZZ
@given(data=st.data())
def test_generated_calibration_jsonl(data: st.DataObject) -> None:
    run_target("calibration_jsonl", gen.jsonl_text(data.draw))


@settings(FUZZ, max_examples=max(EXAMPLES // 3, 5))
@given(data=st.data())
def test_generated_parquet_artifacts(data: st.DataObject) -> None:
    run_target("parquet_v2", gen.parquet_artifact(data.draw, seed("parquet_v2")))


@settings(FUZZ, max_examples=max(EXAMPLES // 3, 5))
@given(data=st.data())
def test_generated_streamed_artifacts(data: st.DataObject) -> None:
    run_target("parquet_stream", gen.parquet_artifact(data.draw, seed("parquet_stream")))


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.glob("*/*") if p.is_file())


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_regression_corpus(path: Path) -> None:
    """Inputs that crashed a reader once; each must now be accepted or a typed error."""
    assert path.stat().st_size <= 256 * 1024, "keep corpus files small"
    run_target(path.parent.name, path.read_bytes())


def test_corpus_covers_every_target() -> None:
    assert {p.parent.name for p in corpus_files()} >= set(TARGETS)
