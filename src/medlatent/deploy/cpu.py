"""Which precisions a backend may run on this CPU.

The rule for ``--precision bf16`` on CPU: allowed only where ``/proc/cpuinfo`` lists ``avx512_bf16`` or
``amx_bf16``. Without those instructions bf16 is emulated in float32 registers plus conversions and measured
slower than fp32 (bench/RESULTS.md, "bf16 on this CPU": 3× slower on an AVX-512 Xeon without them), so it is
refused with one line saying why. Where there is no ``/proc/cpuinfo`` (macOS, Windows) the support cannot be
read and bf16 on CPU is refused likewise. ONNX Runtime runs the graphs in fp32 only.
"""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
DEFAULT_BACKEND, DEFAULT_PRECISION = "torch", "fp32"
# Why the default is what it is: bench/bench_cpu_backends.py, bench/RESULTS.md "CPU deployment backends".
DEFAULT_RULE = "default; no other backend measured both faster and equal (≤1e-4) to it"
CPUINFO = Path("/proc/cpuinfo")
# precisions each backend runs on CPU (torch also fp16 on GPUs, which this module does not judge)
BACKEND_PRECISIONS = {"torch": ("fp32", "bf16", "fp16"), "onnxruntime": ("fp32",), "openvino": ("fp32", "bf16")}


class PrecisionError(ValueError):
    """A backend/precision pair this machine cannot run; the message is one line naming the flag and why."""


def cpu_flags(path: Path = CPUINFO) -> set[str] | None:
    """The feature flags of the first CPU in ``/proc/cpuinfo``; ``None`` where that file is not there."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def bf16_support() -> tuple[bool, str]:
    """Whether this CPU has native bf16 instructions, and the evidence in words."""
    flags = cpu_flags()
    if flags is None:
        return False, f"{CPUINFO} is not there, so the CPU's bf16 support cannot be read"
    have = [f for f in BF16_FLAGS if f in flags]
    if have:
        return True, f"the CPU has {' and '.join(have)}"
    return False, f"the CPU has neither {' nor '.join(BF16_FLAGS)} (per {CPUINFO})"


def resolve(backend: str | None, precision: str | None) -> tuple[str, str, str]:
    """The backend and precision a run uses, and why: what was given, else the measured default."""
    b, p = backend or DEFAULT_BACKEND, precision or DEFAULT_PRECISION
    given = [f"--{k} given" for k, v in (("backend", backend), ("precision", precision)) if v]
    return b, p, "; ".join(given) if given else DEFAULT_RULE


def check_precision(precision: str, backend: str = "torch", device: str = "cpu") -> None:
    """Refuse a precision that ``backend`` cannot run, or bf16 on a CPU without native bf16.

    Raises:
        PrecisionError: one line naming ``--precision``/``--backend`` and the reason.
    """
    allowed = BACKEND_PRECISIONS.get(backend)
    if allowed is None:
        raise PrecisionError(f"--backend {backend!r}: use one of {', '.join(BACKEND_PRECISIONS)}")
    if precision not in allowed:
        raise PrecisionError(f"--precision {precision} is not available with --backend {backend} "
                             f"(it runs {', '.join(allowed)})")
    if backend != "torch" and not str(device).startswith("cpu"):
        raise PrecisionError(f"--backend {backend} runs on the CPU only; drop --device {device} or use --backend torch")
    if precision == "bf16" and str(device).startswith("cpu"):
        ok, why = bf16_support()
        if not ok:
            raise PrecisionError(f"--precision bf16 on CPU needs native bf16 instructions, but {why}; without them "
                                 "bf16 is slower than fp32: use --precision fp32")
