import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # 2-thread BLAS is 60x slower here (docs/MYPYC.md)
from harness.cli import main  # noqa: E402

raise SystemExit(main())
