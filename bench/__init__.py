"""vlmcore.bench: benchmarks of vlmcore's kernels and training steps against references and peers.

Entry point: ``python -m vlmcore.bench`` (or ``vlmcore-bench``); see :mod:`vlmcore.bench.__main__`.
Results format: :mod:`vlmcore.bench.results`; measurement rules: :mod:`vlmcore.bench.harness`;
plots: :mod:`vlmcore.bench.plot`. Per op: :mod:`~vlmcore.bench.contrastive`,
:mod:`~vlmcore.bench.masked_xattn`, :mod:`~vlmcore.bench.resampler`, :mod:`~vlmcore.bench.e2e`.
The one-call GPU check is ``bench/gpu_check.sh OUTDIR`` in the repository.
"""

import vlmcore.kernels  # noqa: F401  (first: it switches the Triton interpreter on when CUDA is absent)
