"""vlmcore.bench: benchmarks of vlmcore's kernels and training steps against references and peers.

Entry point: ``python -m vlmcore.bench`` (or ``vlmcore-bench``); see :mod:`vlmcore.bench.__main__`.
Results format: :mod:`vlmcore.bench.results`; measurement rules: :mod:`vlmcore.bench.harness`;
peers and why each can or cannot run: :mod:`vlmcore.bench.providers`; plots:
:mod:`vlmcore.bench.plot`; exact work plans and predicted times: :mod:`vlmcore.bench.plan`; host
overhead of an eager call: :mod:`vlmcore.bench.host_overhead`; CPU microbenchmarks (pytest-benchmark,
``make bench-cpu``): :mod:`vlmcore.bench.cpu_microbench`.
Per op or model: :mod:`~vlmcore.bench.contrastive`, :mod:`~vlmcore.bench.sigmoid`,
:mod:`~vlmcore.bench.masked_xattn`, :mod:`~vlmcore.bench.resampler`, :mod:`~vlmcore.bench.blip`
(momentum ITC), :mod:`~vlmcore.bench.blip2`, :mod:`~vlmcore.bench.vilbert`, :mod:`~vlmcore.bench.e2e`
(end-to-end training steps), :mod:`~vlmcore.bench.capfilt_decode` (CapFilt captions/s, KV cache vs none).
The GPU plan: :mod:`~vlmcore.bench.gpu_plan` (the two device calls, dry-run), :mod:`~vlmcore.bench.smoke`
(every kernel once against the fp32 reference), :mod:`~vlmcore.bench.gate` (the correctness gate of every
vlmcore row), :mod:`~vlmcore.bench.variants` (compiled-variant counts from the autotune spaces).
The one-call GPU check is ``bench/gpu_check.sh OUTDIR`` in the repository; ``docs/benchmarks.md``.
"""

import vlmcore.kernels  # noqa: F401  (first: it switches the Triton interpreter on when CUDA is absent)
