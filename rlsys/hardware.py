"""What the machine computes well: the compute dtype (``model.dtype: auto``) and thread counts.

Pure Python + torch (no Ray, vLLM, DeepSpeed or Hydra), so the decision is unit-testable by
injecting a :class:`Probe`.

Why it matters: on an x86 CPU without AVX512_BF16 (or AMX-BF16), PyTorch and oneDNN emulate bf16
matrix products, which are then many times slower than float32 (measurements: docs/lab-notes.md#hardware).
``auto`` therefore picks bfloat16 only where the device computes it natively:

* CUDA: compute capability >= 8.0 (Ampere and later);
* x86 CPUs: the ``avx512_bf16`` or ``amx_bf16`` flag, *and* the ISA PyTorch and oneDNN are allowed
  to use is not capped below it (``ATEN_CPU_CAPABILITY=avx2`` / ``ONEDNN_MAX_CPU_ISA=AVX2`` cap it;
  that is how an AVX2-only CPU is emulated on a newer one);
* anything else: float32.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("rlsys.hardware")

COMPUTE_DTYPES = ("bfloat16", "float32")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include native bf16 dot products.
_ONEDNN_BF16_ISAS = (
    "ALL",
    "DEFAULT",
    "AVX512_CORE_BF16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
)


@dataclass(frozen=True)
class Probe:
    """The facts the decision rests on (``probe()`` reads them from this machine)."""

    device: str  # "cuda" | "cpu"
    cuda_capability: tuple[int, int] | None = None  # (major, minor) when device == "cuda"
    cuda_name: str = ""
    cpu_flags: frozenset[str] = frozenset()  # /proc/cpuinfo flags (empty where unknown)
    torch_cpu_capability: str = ""  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", ...
    onednn_max_isa: str = ""  # the ONEDNN_MAX_CPU_ISA environment variable ("" = not set)
    machine: str = ""  # platform.machine()


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # "bfloat16" | "float32"
    native_bf16: bool  # whether the device computes bf16 natively
    reason: str  # one line for the log, e.g. "cpu: AVX2 without AVX512_BF16 -> float32"


def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def probe(device: str | None = None) -> Probe:
    """Read this machine. ``device``: "cuda" or "cpu"; None: cuda when torch sees a GPU."""
    import platform

    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cap: tuple[int, int] | None = None
    name = ""
    if device == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        cap = (major, minor)
        name = torch.cuda.get_device_name(0)
    return Probe(
        device=device,
        cuda_capability=cap,
        cuda_name=name,
        cpu_flags=_cpu_flags(),
        torch_cpu_capability=str(torch.backends.cpu.get_cpu_capability()),
        onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper(),
        machine=platform.machine(),
    )


def native_bf16(p: Probe) -> tuple[bool, str]:
    """(whether ``p``'s device computes bf16 natively, the reason in words)."""
    if p.device == "cuda":
        if p.cuda_capability is None:
            # The workers have GPUs this process cannot see (e.g. a CPU-only head node): every GPU
            # that vLLM and DeepSpeed support well for RL is Ampere or newer.
            return True, "cuda workers (capability not visible from this process; assuming >= 8.0)"
        major, minor = p.cuda_capability
        name = f" {p.cuda_name}" if p.cuda_name else ""
        if major >= 8:
            return True, f"cuda{name} (compute capability {major}.{minor} >= 8.0)"
        return False, f"cuda{name} (compute capability {major}.{minor} < 8.0: no native bf16)"
    flags = p.cpu_flags
    has = [f.upper() for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if not has:
        base = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else (p.machine or "this CPU")
        return False, f"cpu: {base} without AVX512_BF16 or AMX-BF16"
    cap = p.torch_cpu_capability.upper()
    if cap and not cap.startswith("AVX512"):
        return False, f"cpu: has {'/'.join(has)} but PyTorch is capped at {cap} (ATEN_CPU_CAPABILITY)"
    if p.onednn_max_isa and p.onednn_max_isa not in _ONEDNN_BF16_ISAS:
        return False, f"cpu: has {'/'.join(has)} but oneDNN is capped at {p.onednn_max_isa} (ONEDNN_MAX_CPU_ISA)"
    return True, f"cpu: {'/'.join(has)}"


def choose_dtype(requested: str, p: Probe) -> DtypeChoice:
    """Resolve ``model.dtype``: "auto" becomes bfloat16 where native, else float32; an explicit
    value is kept (the caller warns when it is bfloat16 without native support)."""
    native, why = native_bf16(p)
    if requested == "auto":
        dtype = "bfloat16" if native else "float32"
        return DtypeChoice(dtype, native, f"{why} -> {dtype}")
    if requested not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be auto or one of {COMPUTE_DTYPES}, got {requested!r}")
    return DtypeChoice(requested, native, f"{why}; {requested} as configured")


_warned: set[str] = set()


def warn_slow_bf16(choice: DtypeChoice) -> bool:
    """Warn (once per process) that an explicit bfloat16 runs emulated here; True if it warned."""
    if choice.dtype != "bfloat16" or choice.native_bf16 or choice.reason in _warned:
        return False
    _warned.add(choice.reason)
    log.warning(
        "model.dtype=bfloat16 but %s: bf16 matrix products are emulated here, typically 30-40x "
        "slower than float32; use model.dtype=auto (or float32)",
        choice.reason.split(";")[0],
    )
    return True


def dtype_device(num_gpus: float) -> str:
    """The device the workers of a role compute on: cuda when they ask Ray for GPUs."""
    return "cuda" if num_gpus > 0 else "cpu"


def cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs of this machine since boot, from /proc/stat; None elsewhere.

    Two readings give the machine-wide utilisation in between: ``(busy1 - busy0) / (total1 - total0)``
    (1.0 = every core busy). Busy excludes idle and iowait.
    """
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


def utilisation(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float:
    """Fraction of all cores busy between two :func:`cpu_times` readings (nan if unknown)."""
    if start is None or end is None or end[1] <= start[1]:
        return float("nan")
    return (end[0] - start[0]) / (end[1] - start[1])
