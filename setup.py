"""Build arrowquant_core with mypyc (see docs/MYPYC.md for why it looks like this).

ARROWQUANT_PURE=1 skips compilation (pure-Python core, for coverage and debugging).
MYPYC_OPT_LEVEL / MYPYC_DEBUG_LEVEL are read here because mypycify ignores them.
"""

from __future__ import annotations

import os
import sys

from setuptools import find_namespace_packages, setup

CORE = [
    "arrowquant_core/errors.py",
    "arrowquant_core/bf16.py",
    "arrowquant_core/atomic.py",
    "arrowquant_core/parquet_footer.py",
    "arrowquant_core/limits.py",
    "arrowquant_core/schemes.py",
    "arrowquant_core/kernels.py",
    "arrowquant_core/tensor.py",
    "arrowquant_core/model.py",
    "arrowquant_core/metrics.py",
    "arrowquant_core/storage.py",
    "arrowquant_core/actquant.py",
    "arrowquant_core/spatial.py",
    "arrowquant_core/safetensors_io.py",
    "arrowquant_core/diffusion.py",
    "arrowquant_core/clip.py",
    "arrowquant_core/rotation.py",
    "arrowquant_core/hqq.py",
    "arrowquant_core/gptq.py",
    "arrowquant_core/kquant.py",
    "arrowquant_core/igptq.py",
    "arrowquant_core/residual.py",
    "arrowquant_core/methods.py",
    "arrowquant_core/plan.py",
    "arrowquant_core/timeaware.py",
    "arrowquant_core/stream.py",
]

# Metadata-only invocations would compile everything a second time for nothing (~7 s).
_METADATA_ONLY = {"egg_info", "dist_info", "sdist", "--version", "--name"}

ext_modules = []
if os.environ.get("ARROWQUANT_PURE") != "1" and not _METADATA_ONLY.intersection(sys.argv):
    from mypyc.build import mypycify

    ext_modules = mypycify(
        CORE,
        opt_level=os.environ.get("MYPYC_OPT_LEVEL", "3"),
        debug_level=os.environ.get("MYPYC_DEBUG_LEVEL", "1"),
    )

# The folder fixtures/ keeps its name in the repository (the tests import `fixtures`), but
# is installed as `arrowquant_fixtures`: a top-level `fixtures` in site-packages would
# shadow the `fixtures` testing library from PyPI. Harness code imports it through
# harness/fixtures_import.py, and fixtures/ itself uses relative imports only.
FIXTURES_NAME = "arrowquant_fixtures"
packages = find_namespace_packages(include=["arrowquant_core", "arrowquant_core.*", "harness", "harness.*"])
packages += [FIXTURES_NAME + name[len("fixtures"):] for name in find_namespace_packages(include=["fixtures", "fixtures.*"])]

setup(ext_modules=ext_modules, packages=packages, package_dir={FIXTURES_NAME: "fixtures"})
