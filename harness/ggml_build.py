"""Build ggml's quantizer (``libggml-base``) from the llama-cpp-python sdist: ``python -m harness.ggml_build``.

The K-quants (Q2_K ... Q6_K) and IQ types (IQ4_NL, IQ4_XS, IQ3_XXS, IQ2_XS ...) are
quantized only in C, by ggml's ``ggml_quantize_chunk`` (gguf-py ports the legacy types
alone). Building the whole llama-cpp-python sdist (llama, the CPU backend, the server)
takes over 15 minutes on a 2-core machine; the quantizer needs only ggml's base library:
``ggml.c``, ``ggml-quants.c`` (every ``quantize_*`` and ``dequantize_row_*``), and the
few files ``ggml.c`` links against (threading, the backend buffer helpers, gguf). Those
nine files compile in about half a minute with the system's C and C++ compilers, CPU
only, no CMake, no SIMD flags (ggml-base holds the portable reference code: the SIMD
kernels live in the CPU backend, which is not built).

Pinned: llama-cpp-python ``VERSION`` (the same release whose vendored llama.cpp the
peer rules of ``harness.peers`` were checked against), its sdist's ``SDIST_SHA256``
checked after ``pip download``. The library goes to a cache folder keyed by that version
(``cache_dir()``: ``$ARROWQUANT_GGML_DIR`` or ``~/.cache/arrowquant/ggml-<version>/``)
with ``build.json`` (sha256, compiler, wall time). ``make setup`` runs this module; a
missing library later is a ``ConfigurationError`` naming the file and this command.

Example::

    python -m harness.ggml_build            # download (PyPI), verify, compile; skips when built
    python -m harness.ggml_build --force    # rebuild
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Final

from arrowquant_core.errors import ConfigurationError
from harness.results import sha256_file

PACKAGE: Final = "llama-cpp-python"
VERSION: Final = "0.3.36"
SDIST_SHA256: Final = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
GGML_VERSION: Final = "0.25.3"  # ggml/CMakeLists.txt of that sdist (GGML_VERSION_MAJOR.MINOR.PATCH)
LIBRARY: Final = "libggml-base.so"
BUILD_COMMAND: Final = "python -m harness.ggml_build"
_GGML: Final = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/ggml/"

# ggml-base's sources (ggml/src/CMakeLists.txt, add_library(ggml-base ...)), by language
C_SOURCES: Final = ("ggml.c", "ggml-quants.c", "ggml-alloc.c")
CXX_SOURCES: Final = ("ggml.cpp", "ggml-threading.cpp", "ggml-backend.cpp", "ggml-backend-meta.cpp",
                      "ggml-opt.cpp", "gguf.cpp")
# the compile definitions CMake gives ggml-base on Linux (ggml/src/CMakeLists.txt)
DEFINES: Final = ("-D_GNU_SOURCE", "-D_XOPEN_SOURCE=700", "-DGGML_BUILD", "-DGGML_SHARED",
                  "-DGGML_SCHED_MAX_COPIES=4", "-DNDEBUG")


def cache_dir() -> Path:
    """Where the library is built: ``$ARROWQUANT_GGML_DIR`` or ``~/.cache/arrowquant/ggml-<version>``."""
    env = os.environ.get("ARROWQUANT_GGML_DIR")
    return Path(env) if env else Path.home() / ".cache" / "arrowquant" / f"ggml-{VERSION}"


def library_path() -> Path:
    return cache_dir() / LIBRARY


@dataclass(frozen=True)
class BuildRecord:
    """What ``build.json`` says about a built library."""

    version: str
    sdist_sha256: str
    compiler: str
    seconds: float  # download + unpack + compile + link, wall time
    compile_seconds: float

    def __post_init__(self) -> None:
        if self.version != VERSION or self.sdist_sha256 != SDIST_SHA256:
            raise ConfigurationError(f"{cache_dir() / 'build.json'}: built from {PACKAGE} {self.version} "
                                     f"(sha256 {self.sdist_sha256[:12]}...), this harness pins {VERSION}; "
                                     f"rebuild with `{BUILD_COMMAND} --force`")


def read_record(folder: Path | None = None) -> BuildRecord:
    path = (folder or cache_dir()) / "build.json"
    try:
        raw = json.loads(path.read_text())
        fields = (str(raw["version"]), str(raw["sdist_sha256"]), str(raw["compiler"]), float(raw["seconds"]),
                  float(raw["compile_seconds"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"{path}: no readable build record ({type(exc).__name__}); build ggml's "
                                 f"quantizer with `{BUILD_COMMAND}` (make setup runs it)") from None
    return BuildRecord(*fields)  # a record of another version: ConfigurationError naming --force


def download(folder: Path) -> Path:
    """``pip download`` the pinned sdist into ``folder`` and check its sha256."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"{PACKAGE}=={VERSION}", "-d", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if done.returncode != 0 or not found:
        raise ConfigurationError(f"could not download {PACKAGE}=={VERSION}'s sdist from PyPI (needed to build "
                                 f"ggml's K-quant/IQ quantizer): `{' '.join(command)}` exited {done.returncode}: "
                                 f"{done.stderr.strip()[-400:]}; with network access, run `{BUILD_COMMAND}`")
    sha = sha256_file(found[0])
    if sha != SDIST_SHA256:
        raise ConfigurationError(f"{found[0]}: sha256 {sha}, pinned {SDIST_SHA256}; refusing to build from a "
                                 "different file")
    return found[0]


def unpack(sdist: Path, folder: Path) -> Path:
    """Extract ggml's headers and base sources only (a few MB of the 77 MB sdist)."""
    wanted = {_GGML + "src/" + s for s in (*C_SOURCES, *CXX_SOURCES)}
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and (
            m.name in wanted or (m.name.startswith(_GGML + "include/"))
            or (m.name.startswith(_GGML + "src/") and m.name.endswith(".h")))]  # ggml-quants.c reads ggml-cpu/*.h
        tar.extractall(folder, members=members, filter="data")
    return folder / _GGML


def _compiler(env: str, names: tuple[str, ...]) -> str:
    for name in (os.environ.get(env, ""), *names):
        if name and shutil.which(name):
            return name
    raise ConfigurationError(f"no {' or '.join(names)} compiler on PATH (set {env}); building ggml's quantizer "
                             f"needs a C and a C++ compiler (Debian: apt-get install build-essential), then "
                             f"`{BUILD_COMMAND}`")


def compile_library(ggml: Path, out: Path) -> tuple[str, float]:
    """Compile ggml-base's sources (two at a time) and link ``out``; (compiler, seconds)."""
    cc, cxx = _compiler("CC", ("cc", "gcc", "clang")), _compiler("CXX", ("c++", "g++", "clang++"))
    objects = out.parent / "obj"
    objects.mkdir(parents=True, exist_ok=True)
    (objects / "ggml-version.h").write_text(f'#pragma once\n#define GGML_VERSION "{GGML_VERSION}"\n'
                                            f'#define GGML_COMMIT "{PACKAGE}-{VERSION}"\n')
    includes = ["-I", str(ggml / "src"), "-I", str(ggml / "include"), "-I", str(objects)]
    jobs = [[cc, "-O2", "-fPIC", "-std=c11", *DEFINES, *includes, "-c", str(ggml / "src" / s), "-o",
             str(objects / f"{s}.o")] for s in C_SOURCES]
    jobs += [[cxx, "-O2", "-fPIC", "-std=c++17", *DEFINES, *includes, "-c", str(ggml / "src" / s), "-o",
              str(objects / f"{s}.o")] for s in CXX_SOURCES]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), jobs))
    for cmd, done in zip(jobs, results):
        if done.returncode != 0:
            raise ConfigurationError(f"compiling {cmd[-3]} failed (exit {done.returncode}): "
                                     f"{done.stderr.strip()[-600:]}")
    tmp = out.with_name(f".{out.name}.tmp")
    link = [cxx, "-shared", "-o", str(tmp), *(j[-1] for j in jobs), "-Wl,--no-undefined", "-lm", "-lpthread"]
    done = subprocess.run(link, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigurationError(f"linking {out.name} failed (exit {done.returncode}): {done.stderr.strip()[-600:]}")
    os.replace(tmp, out)
    shutil.rmtree(objects)
    return f"{cc} / {cxx}", time.perf_counter() - t0


def build(force: bool = False, log: bool = True) -> BuildRecord:
    """Download, verify and compile into ``cache_dir()``; a no-op when already built."""
    folder = cache_dir()
    if not force and library_path().is_file():
        return read_record(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="arrowquant-ggml-") as tmp:
        if log:
            print(f"downloading {PACKAGE}=={VERSION} (sdist, PyPI) ...", flush=True)
        sdist = download(Path(tmp))
        ggml = unpack(sdist, Path(tmp) / "src")
        if log:
            print(f"compiling ggml-base ({len(C_SOURCES) + len(CXX_SOURCES)} files) into {folder} ...", flush=True)
        compiler, compile_seconds = compile_library(ggml, library_path())
    record = BuildRecord(VERSION, SDIST_SHA256, compiler, time.perf_counter() - t0, compile_seconds)
    (folder / "build.json").write_text(json.dumps({**record.__dict__, "library": LIBRARY,
                                                   "sources": [*C_SOURCES, *CXX_SOURCES]}, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m harness.ggml_build", description=__doc__.split("\n\n")[0],
                                     epilog=f"Builds {LIBRARY} from {PACKAGE}=={VERSION} (sha256 {SDIST_SHA256}) "
                                            f"into {cache_dir()} (override: ARROWQUANT_GGML_DIR).")
    parser.add_argument("--force", action="store_true", help="rebuild even when the library exists")
    args = parser.parse_args(argv)
    try:
        record = build(force=args.force)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{library_path()}: {PACKAGE} {record.version} (sdist sha256 {record.sdist_sha256}), {record.compiler}, "
          f"built in {record.seconds:.1f} s (compile {record.compile_seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
