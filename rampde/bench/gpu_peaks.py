"""The GPUs' dense fp16/bf16 tensor-core peak throughput, so that TFLOP/s read as a fraction of
the hardware.

``dense_fp16_peak_tflops`` gives the dense fp16/bf16 tensor-core peak of a GPU model from
``PEAK_FP16_TFLOPS`` (datasheet figures); ``peak_throughput`` gives the table's entry, with the
source of its figure. NaN (or None) for the CPU and for a GPU missing from the table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

NAN = math.nan


@dataclass(frozen=True)
class PeakThroughput:
    """Dense fp16/bf16 tensor-core peak of one GPU model, and where the figure comes from."""

    model: str
    pattern: str  # regular expression searched in the upper-cased device name
    tflops: float
    source: str


# Dense (no 2:4 sparsity) fp16/bf16 tensor-core TFLOP/s with fp32 accumulation, which is what
# cuBLAS and cuDNN use for torch's fp16 and bf16 matmuls and convolutions. NVIDIA's datasheets
# print the sparse figure ("* with sparsity"); the dense one is half of it. Most specific pattern
# first: "H100 NVL" and "H100 PCIe" before the SXM part ("NVIDIA H100 80GB HBM3"), "L40S" before
# "L4" (word boundaries keep "L40" from matching "L4"). Figures are rounded as NVIDIA quotes them
# (989.4 = 528 tensor cores x 1024 FLOP/clock x 1.83 GHz). The H100 SXM5 and PCIe sparse figures
# were checked against a copy of NVIDIA's H100 table; the others are from the datasheets named.
PEAK_FP16_TFLOPS: tuple[PeakThroughput, ...] = (
    PeakThroughput("H100 NVL", r"\bH100\b.*\bNVL\b", 835.0,
                   "NVIDIA H100 datasheet: FP16/BF16 tensor 1,671 TFLOPS with sparsity, halved"),
    PeakThroughput("H100 PCIe", r"\bH100\b.*\bPCIE\b", 756.0,
                   "NVIDIA H100 datasheet: FP16/BF16 tensor 1,513 TFLOPS with sparsity, halved"),
    PeakThroughput("H100 SXM5", r"\bH100\b", 989.4,
                   "NVIDIA H100 datasheet: FP16/BF16 tensor 1,979 TFLOPS with sparsity, halved; "
                   "torch names it 'NVIDIA H100 80GB HBM3'"),
    PeakThroughput("H200 NVL", r"\bH200\b.*\bNVL\b", 835.0,
                   "NVIDIA H200 datasheet: FP16/BF16 tensor 1,671 TFLOPS with sparsity, halved"),
    PeakThroughput("H200 / GH200", r"H200\b", 989.4,
                   "NVIDIA H200 datasheet (SXM): FP16/BF16 tensor 1,979 TFLOPS with sparsity, halved; "
                   "the same Hopper tensor cores and clocks as the H100 SXM5"),
    PeakThroughput("A100", r"\bA100\b", 312.0,
                   "NVIDIA A100 datasheet: FP16/BF16 tensor 312 TFLOPS dense (624 with sparsity), "
                   "SXM4 and PCIe alike"),
    PeakThroughput("L40S", r"\bL40S\b", 362.0,
                   "NVIDIA L40S datasheet: FP16/BF16 tensor 733 TFLOPS with sparsity, halved (362.05)"),
    PeakThroughput("L4", r"\bL4\b", 121.0,
                   "NVIDIA L4 datasheet: FP16/BF16 tensor 242 TFLOPS with sparsity, halved"),
    PeakThroughput("RTX 4090", r"\bRTX 4090\b", 165.2,
                   "NVIDIA Ada (AD102) whitepaper: GeForce RTX 4090 FP16 tensor with FP32 accumulate "
                   "165.2 TFLOPS dense; with FP16 accumulate it is 330.3, but torch accumulates in fp32"),
    PeakThroughput("V100S", r"\bV100S\b", 130.0, "NVIDIA V100S datasheet: 130 TFLOPS tensor performance"),
    PeakThroughput("V100 PCIe", r"\bV100\b.*\bPCIE\b", 112.0,
                   "NVIDIA V100 datasheet: PCIe 112 TFLOPS tensor performance"),
    PeakThroughput("V100 SXM2", r"\bV100\b", 125.0,
                   "NVIDIA V100 datasheet: SXM2 125 TFLOPS tensor performance (Volta has no bf16)"),
)


def peak_throughput(gpu_name: str) -> PeakThroughput | None:
    """The entry of ``PEAK_FP16_TFLOPS`` whose pattern the device name matches first, or None."""
    name = str(gpu_name).upper()
    for entry in PEAK_FP16_TFLOPS:
        if re.search(entry.pattern, name):
            return entry
    return None


def dense_fp16_peak_tflops(gpu_name: str) -> float:
    """Dense fp16/bf16 tensor-core peak in TFLOP/s of a GPU model named as ``gpu_name`` gives it
    (``NVIDIA H100 80GB HBM3``, ``NVIDIA H100 PCIe``, ``NVIDIA H200``, ...); NaN when unknown
    (the CPU, a GPU missing from ``PEAK_FP16_TFLOPS``)."""
    entry = peak_throughput(gpu_name)
    return entry.tflops if entry is not None else NAN
