"""What the CPU can do fast: the instruction-set features that decide which encoder precision pays.

bf16 inference is only fast where the CPU multiplies bf16 natively (``avx512_bf16`` or Intel AMX on x86,
``bf16`` on Arm). Without it, PyTorch and OpenVINO emulate bf16 and run *slower* than fp32 (measured here on
an AVX2-only AMD EPYC: 55 s per slice with bf16 autocast against ~2 s in fp32).
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Instruction sets that oneDNN / OpenVINO / ONNX Runtime choose their CPU kernels by (x86 and Arm names).
KERNEL_FLAGS = frozenset({
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "asimd", "asimddp", "bf16", "i8mm",
    "sve", "sve2",
})


@dataclass(frozen=True)
class CPUFeatures:
    """Instruction-set features relevant to the encoder backends (``flags``: lower-case names)."""

    model_name: str
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        """True when bf16 matrix products run in hardware (AVX512-BF16, AMX-BF16, or Arm BF16)."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16", "bf16"})

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def int8_dot(self) -> bool:
        """True when the CPU has int8 dot-product instructions (VNNI / AMX-INT8 / Arm dotprod)."""
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})

    def numerics_id(self) -> str:
        """The CPU's model name and the instruction sets the runtimes' kernels are chosen by, as one short string.

        A bf16 verdict holds for the kernels it was measured with: the same LiverSAM, runtime and model on a CPU
        with other instruction sets (AMX instead of AVX512-BF16, AVX2 only) rounds differently. On two AVX-512 +
        bf16 AMD EPYCs of different generations ``bf16-rest`` passed the mask check with min Dice 0.9801 on one and
        failed with 0.9791 on the other, so a cache folder shared between machines (a home folder on a cluster)
        must not hand one CPU's verdict to another (docs/PERFORMANCE.md, session 26)."""
        shown = sorted(self.flags & KERNEL_FLAGS)
        text = f"{self.model_name}|{','.join(shown)}"
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def summary(self) -> str:
        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni", "bf16")
        shown = [name for name in wanted if name in self.flags]
        return f"{self.model_name} ({', '.join(shown) or 'no AVX2'})"


def _linux_flags() -> tuple[str, frozenset[str]]:
    model, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return model, frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # x86: flags; Arm: Features
            flags = set(value.split())
    return model, frozenset(f.lower() for f in flags)


def _macos_flags() -> tuple[str, frozenset[str]]:
    def sysctl(name: str) -> str:
        try:
            out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip()

    flags = set()
    if sysctl("hw.optional.arm.FEAT_BF16") == "1":
        flags.add("bf16")
    if sysctl("hw.optional.arm.FEAT_DotProd") == "1":
        flags.add("asimddp")
    return sysctl("machdep.cpu.brand_string") or platform.processor(), frozenset(flags)


@functools.lru_cache(maxsize=1)
def cpu_features() -> CPUFeatures:
    """The features of the CPU this process runs on (read once; ``/proc/cpuinfo`` or ``sysctl``)."""
    system = platform.system()
    if system == "Linux":
        model, flags = _linux_flags()
    elif system == "Darwin":
        model, flags = _macos_flags()
    else:  # Windows: ask PyTorch what it dispatches to (it knows AVX2 / AVX512; bf16 through oneDNN)
        model, flags = platform.processor(), frozenset()
        try:
            import torch

            capability = str(torch.backends.cpu.get_cpu_capability()).lower()
            extra = {"avx2", "fma"} if "avx2" in capability or "avx512" in capability else set()
            if "avx512" in capability:
                extra.add("avx512f")
            if "amx" in capability:  # conservative: only AMX proves native bf16 here
                extra.add("amx_bf16")
            flags = frozenset(extra)
        except Exception:  # an old torch without these probes: assume the plain path
            flags = frozenset()
    return CPUFeatures(model_name=model or platform.machine(), flags=flags)
