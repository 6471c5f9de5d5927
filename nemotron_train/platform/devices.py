"""Accelerators a run can target: memory and dense peak throughput, in one table.

`plan --device NAME` checks a layout against `memory_gib`; the trainer's MFU divides by the
peak of the precision the GEMMs run in (FP8 runs use the FP8 peak, as NVIDIA's published FP8
MFU does). Peaks are dense (no 2:4 sparsity) vendor figures in TFLOP/s; memory is what the
driver reports as total (a few hundred MiB of it are reserved by the CUDA context).

No torch import: `plan` runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    bf16_tflops: float
    fp8_tflops: Optional[float]  # None: no FP8 tensor cores
    # Substrings of `torch.cuda.get_device_name()` that identify it, most specific first.
    match: Tuple[str, ...]
    # CUDA compute capability: which FP8 recipes and kernels a plan for it may use.
    capability: Tuple[int, int] = (9, 0)

    def peak_tflops(self, fp8: bool) -> float:
        if fp8 and self.fp8_tflops is not None:
            return self.fp8_tflops
        return self.bf16_tflops


_GIB = 1024**3

# Sources: NVIDIA H100 / H200 / Blackwell product datasheets (dense figures, i.e. half the
# "with sparsity" numbers); GB200 as NVIDIA quotes it per GPU for MFU (2450 BF16 / 4900 FP8).
DEVICES: Dict[str, Device] = {
    "h100": Device("h100", 81559 / 1024, 989.0, 1979.0, ("H100 80GB HBM3", "H100 SXM", "H100")),
    "h100-pcie": Device("h100-pcie", 81559 / 1024, 756.0, 1513.0, ("H100 PCIe",)),
    "h100-nvl": Device("h100-nvl", 95830 / 1024, 835.0, 1671.0, ("H100 NVL",)),
    "h200": Device("h200", 143771 / 1024, 989.0, 1979.0, ("H200",)),
    "b200": Device("b200", 180e9 / _GIB, 2250.0, 4500.0, ("B200",), (10, 0)),
    "gb200": Device("gb200", 186e9 / _GIB, 2450.0, 4900.0, ("GB200",), (10, 0)),
    "a100": Device("a100", 81920 / 1024, 312.0, None, ("A100",), (8, 0)),
}

# The device a cluster plan assumes when none is named.
DEFAULT_DEVICE = "h100"


def device_names() -> Tuple[str, ...]:
    return tuple(DEVICES)


def get_device(name: str) -> Device:
    """The table entry for a `--device` name; KeyError lists nothing, callers name the choices."""
    return DEVICES[name.lower()]


def match_device(cuda_name: str) -> Optional[Device]:
    """The entry whose marker appears in a CUDA device name (PCIe/NVL before plain H100)."""
    best = None
    best_len = 0
    for dev in DEVICES.values():
        for marker in dev.match:
            if marker in cuda_name and len(marker) > best_len:
                best, best_len = dev, len(marker)
    return best


def largest_device() -> Device:
    """The device of the table with the most memory (what no plan may exceed)."""
    return max(DEVICES.values(), key=lambda d: d.memory_gib)
