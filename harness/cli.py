"""Command line: ``python -m harness run|list|report``.

The CLI parses into a frozen ``RunConfig`` and calls ``harness.runner.run``; heavy
imports (torch, pytest) happen inside the command so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys
import traceback
from typing import Any

from harness.criteria import profiled
from arrowquant_core.errors import ArrowQuantError, ConfigurationError
from arrowquant_core.limits import cut
from harness import exitcodes

EXAMPLES = """examples:
  python -m harness run --model minilm                 # INT8, INT4, INT2 with the default gates
  python -m harness run --model minilm --bits 4        # one bit width
  python -m harness run --model minilm --profile edge  # INT2 with the fallback ladder and mixed precision
  python -m harness run --model minilm --compare       # plus every method compared at INT4 and INT2
  python -m harness run --model path/to/checkpoint/    # any safetensors / .npy folder or Parquet v1 file
  python -m harness run --model minilm --criteria my.toml --out build/report
  python -m harness run --model minilm --baseline last-release/results.json   # regression gate
  python -m harness run --model minilm --artifact minilm-Q4_0.gguf   # judge a GGUF made elsewhere
  python -m harness report reports/results.json        # re-render the report from results
  python -m harness verify reports/results.json        # re-check results against artifacts and criteria
  python -m harness verify reports/streaming_results.json   # the same for a streaming run
  python -m harness list                               # models, schemes, metrics, faults
  python -m harness sweep --model dream-mini --bits 8,4 --methods rtn,hqq   # a grid of runs on Ray
"""


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer")
    return n


def _bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of bit widths, e.g. 8,4,2") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(exitcodes.USAGE)


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="python -m harness", description="ArrowQuant: quantize a model, validate it, sign it off.",
                  epilog=EXAMPLES + "\n" + exitcodes.epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="quantize, run the acceptance suite, write the report",
                         epilog=EXAMPLES + "\n" + exitcodes.epilog(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--model", required=True, help="model name (see `list`) or path to a checkpoint")
    run.add_argument("--bits", type=_bits, default=(), help="comma-separated bit widths (default: all in the criteria file)")
    run.add_argument("--criteria", type=Path,
                     help="criteria TOML (default: harness/criteria/<model>.toml; for a path, the criteria of its "
                          "runner, runner-<runner>.toml, or weights.toml when no runner can run it)")
    profiles = profiled()
    run.add_argument("--profile", choices=sorted(profiles),
                     help="deployment profile, for the models that have criteria for it: "
                          + "; ".join(f"{p}: {', '.join(bases)}" for p, bases in sorted(profiles.items()))
                          + " (edge runs the INT2 fallback ladder)")
    run.add_argument("--runner", help="how to run the model for output-level metrics (default: detected from the "
                                      "folder; see `list`), or `none` for weight-level validation only")
    run.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports/)")
    run.add_argument("--baseline", type=Path,
                     help="results.json of an earlier run: rules like 'output_cosine_mean >= baseline - 0.002' "
                          "in the criteria are judged against it; refused when it was made with another "
                          "model, criteria file or scheme")
    run.add_argument("--compare", action="store_true",
                     help="also compare every quantization method the criteria list (rtn, clip, hqq, gptq, "
                          "residual2) on the same inputs, with a quality-versus-size chart; adds about a minute. "
                          "The criteria's `peers` add llama.cpp's formats as real GGUF files: the legacy types "
                          "quantized by gguf-py, the K-quant and IQ types (--pure, '+imatrix' = with llama.cpp's "
                          "importance matrix from the calibration sentences) by ggml's own quantizer, built by "
                          "`make setup` (python -m harness.ggml_build); bits per weight from the file's bytes")
    run.add_argument("--fail-fast", action="store_true",
                     help="stop the run when the time-aware activation pass fails (default: fall back to base "
                          "quantization, counted in results.json `fallbacks` and caught by the activation-table gates)")
    run.add_argument("--artifact", type=Path,
                     help="judge this GGUF file (llama.cpp's llama-quantize, gguf-py, harness.peers) instead of "
                          "quantizing the model: read with gguf-py, tensors mapped to the model's names (llama.cpp's "
                          "or the source's), dequantized, and judged by the same suite (size from the file, load "
                          "time, per-layer weight metrics, accounting, outputs through the runner). The bit width "
                          "whose criteria apply is --bits N, or, without it, the largest in the criteria not above "
                          "the nominal bits per weight of the file's main tensor type (Q8_0 -> 8, Q4_0 -> 4, "
                          "Q5_1 -> 4, Q4_K -> 4). Tests that apply only to artifacts ArrowQuant writes (v2 round trip, v1 "
                          "paths, quantize time, source digest, plan match) are reported as not measured and left "
                          "out of the verdict. Other formats are refused")
    run.add_argument("--rounds", type=int, default=3, help="benchmark rounds of the load-time gate (default: 3)")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.add_argument("--threads", type=_threads,
                     help="threads for the measurement work (each model evaluation runs on one thread, several "
                          "side by side; results are identical with any count). Default: ARROWQUANT_THREADS, "
                          "else every core")
    stream = run.add_mutually_exclusive_group()
    stream.add_argument("--stream", dest="stream", action="store_true", default=None,
                        help="weight-level validation streamed tensor by tensor (bounded memory; "
                             "harness/criteria/streaming.toml unless --criteria; KL through a layer-streaming denoiser "
                             "for Dream folders): the default when PATH's safetensors weights (one file, or the "
                             "shards of model.safetensors.index.json) exceed 1 GiB; writes "
                             "STREAMING_VALIDATION_REPORT.md and streaming_results.json")
    stream.add_argument("--no-stream", dest="stream", action="store_false",
                        help="never stream: the in-memory acceptance suite whatever the size")
    run.add_argument("--inject-fault", dest="fault", help="self-test: break the quantizer on purpose (see `list`); "
                                                          "with --stream, the faults `list` marks [s]; with --artifact, "
                                                          "break a copy of the file (gguf-* faults)")
    _add_sweep(sub)
    sub.add_parser("list", help="list models, schemes, methods, metrics and faults")
    rep = sub.add_parser("report", help="re-render the Markdown report from a results.json "
                                        "(or a streaming run's streaming_results.json)")
    rep.add_argument("results", type=Path)
    rep.add_argument("--out", type=Path, help="report path (default: next to results.json)")
    ver = sub.add_parser("verify", help="re-check a results.json (or streaming_results.json) against its "
                                        "artifacts (sha256) and criteria "
                                        "(sha256, every gate re-evaluated); exit 0/1 = the verified verdict, "
                                        "2 = the results do not hold up")
    ver.add_argument("results", type=Path)
    return top


def _add_sweep(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sweep = sub.add_parser("sweep", help="models x bit widths x methods (x profiles), each cell a run on Ray",
                           epilog="examples:\n  python -m harness sweep --model dream-mini --bits 8,4 --methods rtn\n"
                                  "  python -m harness sweep --model minilm,dream-mini --bits 4 --methods rtn,hqq "
                                  "--address ray://head:10001\n\n" + exitcodes.epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("--model", required=True, help="comma-separated model names or paths")
    sweep.add_argument("--bits", type=_bits, required=True, help="comma-separated bit widths")
    sweep.add_argument("--methods", default="rtn", help="comma-separated methods (see `list`; default: rtn)")
    sweep.add_argument("--profiles", default="", help="comma-separated profiles; 'default' = no profile")
    sweep.add_argument("--out", type=Path, default=Path("reports/sweep"), help="output folder (default: reports/sweep)")
    sweep.add_argument("--address", help="Ray cluster address (default: a private local Ray instance)")
    sweep.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance (default: 2)")
    sweep.add_argument("--rounds", type=int, default=3, help="benchmark rounds of each cell's timing gates (default: 3)")
    sweep.add_argument("--quiet", action="store_true", help="no progress lines")


def _sweep(args: argparse.Namespace) -> int:
    from harness.sweep import SweepConfig, sweep

    names = [p.strip() for p in args.profiles.split(",") if p.strip()] or ["default"]
    config = SweepConfig(models=tuple(m.strip() for m in args.model.split(",") if m.strip()), bits=args.bits,
                         methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                         profiles=tuple(None if p == "default" else p for p in names), out=args.out,
                         address=args.address, num_cpus=args.num_cpus, quiet=args.quiet,
                         benchmark_rounds=args.rounds)
    code, report = sweep(config)
    print(report)
    return code


def _list() -> int:
    from arrowquant_core.schemes import SCHEMES
    from harness.criteria import available
    from harness.faults import FAULTS, streams
    from harness.fixtures_import import fixtures_module
    from harness.measures import METRICS

    MODELS = fixtures_module("checkpoint").MODELS
    RUNNERS = fixtures_module("runners").RUNNERS

    print("models:")
    for entry in MODELS.values():
        print(f"  {entry.name:24s} {entry.description} [runner {entry.runner}]")
    print("  <path>                   model folder (safetensors, sharded ok; .npy; sentence-transformers), "
          "a .safetensors or Parquet v1 file")
    print("runners (detected from a model folder in this order; --runner NAME overrides, --runner none = "
          "weights only):")
    for runner in RUNNERS.values():
        print(f"  {runner.name:24s} {runner.description} [detects: {runner.detects}]")
    print("criteria files: " + ", ".join(available()))
    print("schemes:")
    for scheme in SCHEMES.values():
        print(f"  {scheme.name:20s} {scheme.description}")
    from arrowquant_core.methods import METHODS

    print("methods:")
    for method in METHODS.values():
        print(f"  {method.name:20s} {method.description}")
    print("metrics:")
    for metric in METRICS.values():
        print(f"  {metric.name:22s} {metric.description}")
    from harness.peers import PEERS

    print("peer formats (llama.cpp, quantized by gguf-py or ggml; criteria `peers = [...]`):")
    for peer in PEERS.values():
        print(f"  {peer.name:19s} {peer.nominal_bits_per_weight:5.2f} bpw  {peer.ggml_type.name:7s} "
              f"{peer.quantizer:7s} {peer.description}")
    print("faults (for --inject-fault; [s]: also in a streaming run):")
    for fault in FAULTS.values():
        print(f"  {fault.name:26s} {'[s] ' if streams(fault.name) else '    '}{fault.description}")
    from harness.external import GGUF_FAULTS

    print("faults of a GGUF file (for --inject-fault with --artifact):")
    for gfault in GGUF_FAULTS.values():
        print(f"  {gfault.name:24s} {gfault.description}")
    return exitcodes.OK


def _say(text: str) -> None:
    """print to stdout; a reader that went away (``| head -1``) is not an error and must
    not change the exit code: stdout is pointed at /dev/null so the interpreter's final
    flush stays quiet too (Python docs, "Note on SIGPIPE")."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _stdout_gone()


def _stdout_gone() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def _refuse(path: Path, problems: list[Any], consequence: str) -> int:
    shown = problems[:20]
    print(f"error: {path}: {len(problems)} integrity problem(s); {consequence}:", file=sys.stderr)
    for problem in shown:
        print(f"  - {problem}", file=sys.stderr)
    if len(problems) > len(shown):
        print(f"  ... and {len(problems) - len(shown)} more", file=sys.stderr)
    return exitcodes.USAGE


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    threads = getattr(args, "threads", None)
    if threads is None:
        return _main(args)
    from harness.fixtures_import import fixtures_module

    env_name: str = fixtures_module("parallel").ENV

    previous = os.environ.get(env_name)
    os.environ[env_name] = str(threads)  # read by the runners (fixtures.parallel.threads)
    try:
        return _main(args)
    finally:
        if previous is None:
            os.environ.pop(env_name, None)
        else:
            os.environ[env_name] = previous


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "list":
            try:
                code = _list()
                sys.stdout.flush()
            except BrokenPipeError:
                _stdout_gone()
                code = exitcodes.OK
            return code
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            from harness import streaming
            from harness.integrity import consistency_problems
            from harness.report import render_report
            from harness.results import read_results, write_text_atomic

            results = read_results(args.results)
            if streaming.is_streaming_results(results):
                problems = streaming.verify_streaming(results, args.results)
                if problems:
                    return _refuse(args.results, problems, "the report was not written")
                out = args.out or args.results.parent / streaming.REPORT_NAME
                write_text_atomic(out, streaming.render(results))
                _say(str(out))
                return exitcodes.OK
            problems = consistency_problems(results)
            if problems:
                return _refuse(args.results, problems, "the report was not written")
            out = args.out or args.results.parent / "QUANTIZATION_VALIDATION_REPORT.md"
            render_report(results, out)
            _say(str(out))
            return exitcodes.OK
        if args.command == "verify":
            from harness import streaming
            from harness.integrity import verify
            from harness.results import read_results

            results = read_results(args.results)
            problems = (streaming.verify_streaming(results, args.results) if streaming.is_streaming_results(results)
                        else verify(results, args.results))
            if problems:
                return _refuse(args.results, problems, "it does not hold up")
            _say(f"verified {args.results}: verdict {results['verdict']}, artifacts and criteria match")
            return exitcodes.OK if results["verdict"] == "PASS" else exitcodes.GATE_FAILED
        from harness.streaming import StreamingConfig, run_streaming, should_stream

        if should_stream(args.model, args.stream):
            if (args.compare or args.baseline or args.profile or args.artifact or args.fail_fast
                    or args.runner not in (None, "none")):
                raise ConfigurationError("the streaming run (--stream, or a safetensors file over 1 GiB) takes "
                                         "--bits, --criteria, --inject-fault, --out and --quiet only; pass --no-stream "
                                         "for the rest")
            code, report_path = run_streaming(StreamingConfig(model=args.model, bits=args.bits, out=args.out,
                                                              criteria=args.criteria, quiet=args.quiet,
                                                              outputs=args.runner != "none", fault=args.fault))
            _say(f"{'PASS' if code == 0 else 'FAIL'}: {report_path}")
            return code
        from harness.fixtures_import import fixtures_module
        from harness.api import run_config
        from harness.config import RunConfig

        fixtures_module("parallel").threads()  # a bad ARROWQUANT_THREADS is a usage error now, not a failed test later

        config = RunConfig(model=args.model, bits=args.bits, criteria=args.criteria, out=args.out,
                           fault=args.fault, profile=args.profile, compare=args.compare,
                           benchmark_rounds=args.rounds, quiet=args.quiet, runner=args.runner,
                           baseline=args.baseline, fail_fast=args.fail_fast, artifact=args.artifact)
        result = run_config(config)
        _say(f"{result.verdict}: {result.report_path}")
        return result.exit_code
    except ConfigurationError as exc:
        print(f"error: {cut(str(exc), 4000)}", file=sys.stderr)
        return exitcodes.USAGE
    except ArrowQuantError as exc:
        print(f"error: {cut(str(exc), 4000)}", file=sys.stderr)  # bounded, whatever a file held
        return exitcodes.USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return exitcodes.HARNESS_ERROR
    except Exception:  # the harness itself failed: say so, with the traceback
        traceback.print_exc()
        print("error: the harness failed (exit 3); this is a bug or an environment problem, not a verdict",
              file=sys.stderr)
        return exitcodes.HARNESS_ERROR
