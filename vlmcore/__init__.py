"""vlmcore: fused Triton kernels and training core for vision-language models on frozen LMs.

Modules (``nn.Module``) built on the ops of :mod:`vlmcore.kernels`; the trainer lives in
:mod:`vlmcore.train`, the benchmarks in :mod:`vlmcore.bench`.
"""

from vlmcore import kernels
from vlmcore.losses import ContrastiveLoss

__version__ = "0.1.0"

__all__ = ["ContrastiveLoss", "kernels"]
