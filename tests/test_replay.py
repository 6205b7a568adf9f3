"""Layer replay (fixtures/runners/replay.py): the ladder's scores start at the first
changed encoder layer from the source run's hidden states, and give the very embeddings
a whole run gives -- on the real MiniLM."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from arrowquant_core import dequantize, quantize
from fixtures.checkpoint import load_model
from fixtures.runners import replay
from fixtures.runners.sentence_transformers import LADDER_BATCH, LADDER_SENTENCES, SentenceTransformersRunner


@pytest.fixture(scope="module")
def runner() -> SentenceTransformersRunner:
    r = load_model("minilm").runner
    assert isinstance(r, SentenceTransformersRunner)
    return r


@pytest.fixture(scope="module")
def recorded(runner: SentenceTransformersRunner) -> tuple[list[str], replay.Record]:
    sentences = runner.calibration[::10][:LADDER_SENTENCES]
    record = replay.Record(6)
    runner.encode(sentences, job=record)
    return sentences, record


def _with(runner: SentenceTransformersRunner, *names: str) -> dict[str, np.ndarray]:
    weights = dict(runner.source)
    for name in names:  # INT2: a change every later layer feels
        weights[name] = dequantize(quantize(weights[name], "int2-g32-asym"))
    return weights


@pytest.mark.parametrize("names, start", [
    (["encoder.layer.3.attention.self.value.weight"], 3),
    (["encoder.layer.5.output.dense.weight"], 5),
    (["encoder.layer.1.intermediate.dense.weight", "encoder.layer.4.attention.output.dense.weight"], 1),
])
def test_replayed_embeddings_equal_a_whole_run_bit_for_bit(
        runner: SentenceTransformersRunner, recorded: tuple[list[str], replay.Record],
        names: list[str], start: int) -> None:
    sentences, record = recorded
    assert replay.first_changed_layer(names) == start
    weights = _with(runner, *names)
    whole = runner.encode(sentences, weights)
    again = runner.encode(sentences, weights, job=replay.Replay(record, start))
    assert np.array_equal(whole, again)


def test_starting_one_layer_too_late_skips_the_change_and_it_shows(
        runner: SentenceTransformersRunner, recorded: tuple[list[str], replay.Record]) -> None:
    # what the equality above would catch if the runner picked the wrong start
    sentences, record = recorded
    weights = _with(runner, "encoder.layer.3.attention.self.value.weight")
    late = runner.encode(sentences, weights, job=replay.Replay(record, 4))
    assert not np.array_equal(runner.encode(sentences, weights), late)
    assert np.array_equal(late, runner.encode(sentences))  # layers 3.. ran on source weights' states


def test_the_ladder_score_uses_replay_and_matches_whole_runs(runner: SentenceTransformersRunner) -> None:
    score = runner.calibration_score()
    weights = _with(runner, "encoder.layer.4.intermediate.dense.weight")
    sentences = runner.calibration[::10][:LADDER_SENTENCES]
    from arrowquant_core.metrics import row_cosines
    # whole runs in the score's batches (other batches pad differently: other float sums)
    def whole_run(w: dict[str, np.ndarray] | None = None) -> np.ndarray:
        return runner.encode(sentences, w, batch_size=LADDER_BATCH)
    whole = float(row_cosines(whole_run(), whole_run(weights)).mean())
    assert score(weights) == whole < 1.0
    assert score(dict(runner.source)) == pytest.approx(1.0, abs=1e-6)  # nothing changed: a whole run
    # embeddings (outside encoder.layer.N) change everything: a whole run, same figure
    emb = _with(runner, "embeddings.word_embeddings.weight")
    whole = float(row_cosines(whole_run(), whole_run(emb)).mean())
    assert score(emb) == whole


def test_replay_on_two_threads_with_leased_copies(runner: SentenceTransformersRunner,
                                                  recorded: tuple[list[str], replay.Record]) -> None:
    """Jobs are per thread: two replays at once (one of them on a leased deep copy of the
    model, which carries the replayable forwards) and a plain run on a third thread."""
    sentences, record = recorded
    weights = {3: _with(runner, "encoder.layer.3.output.dense.weight"),
               5: _with(runner, "encoder.layer.5.attention.self.query.weight")}
    want = {k: runner.encode(sentences, w) for k, w in weights.items()}
    plain = runner.encode(sentences)
    got: dict[object, np.ndarray] = {}

    def work(key: object) -> None:
        if key == "plain":
            got[key] = runner.encode(sentences)
        else:
            got[key] = runner.encode(sentences, weights[key], job=replay.Replay(record, key))  # type: ignore[arg-type]
    threads = [threading.Thread(target=work, args=(k,)) for k in (3, 5, "plain")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(got[3], want[3]) and np.array_equal(got[5], want[5])
    assert np.array_equal(got["plain"], plain)


def test_a_replay_of_other_sentences_is_refused(runner: SentenceTransformersRunner,
                                                recorded: tuple[list[str], replay.Record]) -> None:
    sentences, record = recorded
    with pytest.raises(RuntimeError, match="not recorded|recorded batches"):
        runner.encode(sentences[:5] + ["a sentence that was never recorded, and longer than the rest " * 3],
                      _with(runner, "encoder.layer.2.output.dense.weight"), job=replay.Replay(record, 2))
    with pytest.raises(ValueError, match="outside"):
        replay.Replay(record, 0)


def test_layers_that_return_tuples_turn_replay_off() -> None:
    """An architecture whose layers return (hidden, attention) tuples: recording marks the
    record unusable and a replay of it is refused, so the ladder scores run whole."""
    import torch

    class TupleLayer(torch.nn.Module):
        def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, None]:
            return hidden * 2, None

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.ModuleList([TupleLayer(), TupleLayer()])

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = Encoder()

    net = Net()
    assert replay.install(net) == 0  # not a checked architecture: never replayed
    Net.__name__ = "BertModel"  # as if it were one, to reach the recording
    assert replay.install(net) == 2
    record = replay.Record(2)
    with replay.running(record):
        out, _ = net.encoder.layer[0](torch.ones(1, 3))
    assert torch.equal(out, torch.full((1, 3), 2.0)) and not record.usable
    with pytest.raises(ValueError, match="cannot be replayed"):
        replay.Replay(record, 1)


def test_first_changed_layer() -> None:
    assert replay.first_changed_layer(["encoder.layer.2.x.weight", "encoder.layer.10.y.weight"]) == 2
    assert replay.first_changed_layer(["encoder.layer.4.x", "embeddings.word_embeddings.weight"]) is None
    assert replay.first_changed_layer(["pooler.dense.weight"]) is None
    assert replay.first_changed_layer([]) is None
