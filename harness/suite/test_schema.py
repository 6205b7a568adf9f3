"""Category 4 — schema compatibility: v1 read, v2 write, v2 read by the v1 path, exact round trip."""

import pytest

import arrowquant_core as aq
from harness.context import RunContext
from harness.suite.checks import assert_bit_identical


@pytest.mark.made_here(metrics=("roundtrip_exact",), why="the exact round trip is a property of ArrowQuant's Parquet "
                       "v2 codec; a GGUF file holds no ArrowQuant codes to compare")
def test_v2_written_and_round_trip_exact(ctx: RunContext, bits: int) -> None:
    written = ctx.written(bits)
    assert aq.format_version(written.path) == 2, f"{written.path} is not format v2"
    reloaded = ctx.reloaded(bits)
    ctx.gate("test_v2_written_and_round_trip_exact", bits,
             {"roundtrip_exact": 1.0 if reloaded.roundtrip_exact else 0.0})


@pytest.mark.made_here(metrics=(), why="ArrowQuant's v1 reading path reads Parquet v2 files, not GGUF")
def test_v1_path_reads_v2(ctx: RunContext, bits: int) -> None:
    """The float (v1) reading path dequantizes a v2 file to the same values as load()."""
    written = ctx.written(bits)
    via_v1 = aq.load_weights(written.path)  # one tensor after another: the other order of work
    direct = ctx.reloaded(bits).weights
    assert list(via_v1) == list(direct), "tensor order differs between the v1 and v2 paths"
    for name, array in direct.items():
        assert_bit_identical(via_v1[name], array, f"tensor {name}")


@pytest.mark.made_here(metrics=(), why="checks ArrowQuant's own v1 float format, which plays no part in judging a "
                       "GGUF file")
def test_v1_float_round_trip(ctx: RunContext, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    """A format v1 file of the original weights reads back bit-exact (uncompressed: the
    check is the round trip, and zstd of float32 weights was most of its time)."""
    path = tmp_path_factory.mktemp("v1") / "weights-v1.parquet"
    aq.save_weights(ctx.checkpoint.weights, path, compression="none")
    assert aq.format_version(path) == 1
    back = aq.load_weights(path)
    for name, array in ctx.checkpoint.weights.items():
        assert_bit_identical(back[name], array, f"tensor {name}")


@pytest.mark.made_here(metrics=("source_match",), why="a GGUF file records no digest of the weights it was made "
                       "from; the per-tensor weight gates compare it with this model instead")
def test_artifact_was_made_from_this_model(ctx: RunContext, bits: int) -> None:
    """The artifact records the digest of the weights it was quantized from; a stale
    artifact (made from an earlier version of the model) must not pass as this one."""
    reloaded = ctx.reloaded(bits)
    ctx.gate("test_artifact_was_made_from_this_model", bits, {"source_match": 1.0 if reloaded.source_match else 0.0})
