"""Shared step of the sm_90 compile checks (``tests/*_compile_check.py``): one Triton kernel variant
through Triton's own GPU compiler for an H100 (sm_90a) and its bundled ``ptxas -v``. No GPU needed."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@dataclass
class Sm90Build:
    """One compiled variant: its PTX, ptxas' spill bytes and registers per thread, shared memory and
    cubin bytes."""

    ptx: str
    spill_bytes: int
    registers: int | None
    shared: int
    cubin_bytes: int


def compile_sm90(fn, signature: dict, constexprs: dict, attrs: dict, num_warps: int, num_stages: int) -> Sm90Build:
    """Compile ``fn`` (a JITFunction) with ``signature`` / ``constexprs`` / ``attrs`` for sm_90a and read
    ``ptxas -v``'s report of the PTX."""
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        report = subprocess.run([PTXAS, "--gpu-name", "sm_90a", "-v", handle.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(handle.name)
    spills = re.search(r"(\d+) bytes spill stores", report)
    registers = re.search(r"Used (\d+) registers", report)
    return Sm90Build(ptx=ptx, spill_bytes=int(spills.group(1)) if spills else 0,
                     registers=int(registers.group(1)) if registers else None, shared=kernel.metadata.shared,
                     cubin_bytes=len(kernel.asm.get("cubin", b"")))
