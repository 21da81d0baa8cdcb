"""CAD model efficiency on images vs latents (paper §4.2, Figure 2).

For one classifier, compares inputs of size ``S`` (high-resolution images) with latent-sized inputs ``S/s``
(per-axis reduction ``s``; the paper's downsizing factor is ``f = s²`` in 2D and ``s³`` in 3D):

* latency — milliseconds for one forward pass on a batch (median of ``repeats`` after ``warmup`` passes);
* throughput — items per second at that batch size;
* maximum batch size — the largest power of two whose forward pass fits, found by doubling from 1 and
  stopping at the first failure: an out-of-memory error, or peak memory above ``max_memory_gb``. On CPU the
  cap defaults to half the memory available at the start, and a batch is not even tried when its memory,
  extrapolated linearly from the previous one, would exceed the cap — so the search stops instead of swapping.

The paper: HRNet-w64 on 1024² images vs f=16 / f=64 latents (A100), SEResNet-152 on 256³ volumes vs
f=64 / f=512 latents (A6000). On CPU, run it at reduced sizes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medlatent.evaluation.classifiers import PAPER_CLASSIFIER, build_classifier

logger = logging.getLogger(__name__)

PAPER_SETTINGS = {2: (1024, (16, 64)), 3: (256, (64, 512))}  # image size per axis, downsizing factors f


# ------------------------------------------------------------------------------------------ memory
def is_oom(e: BaseException) -> bool:
    """Out-of-memory errors of any device (CUDA OOM, CPU allocator failure, MemoryError)."""
    if isinstance(e, MemoryError) or isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux ``/proc``, else psutil; ``None`` when neither is available)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return None


def available_bytes() -> int | None:
    """Memory the system can still give (``MemAvailable``), or ``None`` when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def _release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so the RSS baseline excludes it.

    Without this, glibc keeps freed blocks of an earlier batch resident (its mmap threshold grows after large
    frees), the next batch reuses them, and its RSS growth — the measured peak — reads as zero.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may then include freed memory
        pass


class PeakMemory:
    """Peak memory above the level at entry, while the block runs (``.peak_bytes``).

    CUDA: the allocator's peak. CPU: resident memory sampled every millisecond by a thread, plus explicit
    :meth:`sample` calls (call it while the outputs are still alive).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _release_freed_memory()
            self._base = rss_bytes() or 0
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.001):
            self.sample()

    def sample(self) -> None:
        if self.device.type == "cuda":
            now = torch.cuda.max_memory_allocated(self.device)
        else:
            now = rss_bytes() or 0
        self.peak_bytes = max(self.peak_bytes, now - self._base)

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.sample()


# ------------------------------------------------------------------------------------------ measurements
def _device_of(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: nn.Module, x: torch.Tensor, backward: bool) -> torch.Tensor:
    """One forward pass (inference mode), or forward + backward of the summed output (a training step)."""
    if not backward:
        with torch.inference_mode():
            return model(x)
    out = model(x)
    out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return out.detach()


@dataclass
class Latency:
    """Median latency of one batch (ms), throughput (items/s) and every timed repeat (ms)."""

    batch_size: int
    latency_ms: float
    throughput: float
    times_ms: list[float]


def measure_latency(model: nn.Module, shape: Sequence[int], batch_size: int, *, device: str | None = None,
                    repeats: int = 5, warmup: int = 2, backward: bool = False) -> Latency:
    """Time forward passes on random inputs ``batch_size×shape``.

    Args:
        model: the classifier (moved to ``device``).
        shape: one item, ``C×H×W`` or ``C×D×H×W``.
        batch_size: items per pass.
        device: default: where the model is.
        repeats: timed passes (≥ 3); the median is reported.
        warmup: untimed passes first (allocator, cuDNN autotuning, lazy init).
        backward: time a training step (forward + backward) instead of a forward pass.
    """
    if repeats < 3:
        raise ValueError(f"repeats must be ≥ 3 (the median of several passes), got {repeats}")
    if batch_size < 1 or warmup < 0:
        raise ValueError(f"batch_size must be ≥ 1 and warmup ≥ 0, got {batch_size} and {warmup}")
    dev = _device_of(model, device)
    model.to(dev).train(backward)
    x = torch.randn((batch_size, *shape), device=dev)
    for _ in range(warmup):
        _step(model, x, backward)
    _sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _step(model, x, backward)
        _sync(dev)
        times.append(1000 * (time.perf_counter() - t0))
    ms = statistics.median(times)
    return Latency(batch_size, ms, batch_size / (ms / 1000), times)


@dataclass
class BatchTry:
    """One step of the search: the batch size, whether it fitted, why not, and the peak memory (GB)."""

    batch_size: int
    ok: bool
    reason: str = ""
    peak_gb: float | None = None


@dataclass
class BatchSearch:
    """Result of :func:`max_batch_size`: the largest fitting power of two (0: not even 1) and the tries."""

    max_batch_size: int
    tries: list[BatchTry] = field(default_factory=list)
    limit_reached: bool = False


def max_batch_size(model: nn.Module, shape: Sequence[int], *, device: str | None = None, start: int = 1,
                   limit: int = 1024, max_memory_gb: float | None = None, backward: bool = False,
                   make_input: Callable[[int], torch.Tensor] | None = None) -> BatchSearch:
    """Largest power-of-two batch whose pass fits; doubles from ``start`` and stops at the first failure.

    Args:
        model: the classifier.
        shape: one item, ``C×…``.
        device: default: where the model is.
        start: first batch size (a power of two).
        limit: largest batch size tried (the search stops there with ``limit_reached``).
        max_memory_gb: peak memory above which a batch counts as failed. Default: none on CUDA (the real OOM
            decides); on CPU half of the memory available now. On CPU a batch whose linearly extrapolated
            peak exceeds the cap fails without being run.
        backward: measure training steps (forward + backward) instead of forward passes.
        make_input: ``batch → input tensor`` (default: random normal ``batch×shape`` on the device).
    """
    if start < 1 or start & (start - 1):
        raise ValueError(f"start must be a power of two ≥ 1, got {start}")
    dev = _device_of(model, device)
    model.to(dev).train(backward)
    cap = None if max_memory_gb is None else max_memory_gb * 2**30
    if cap is None and dev.type == "cpu":
        avail = available_bytes()
        cap = avail / 2 if avail else None
        if cap is None:
            logger.warning("cannot read this system's free memory: the CPU batch search has no memory cap")
    make_input = make_input or (lambda b: torch.randn((b, *shape), device=dev))
    result = BatchSearch(0)
    prev: BatchTry | None = None
    b = start
    while True:
        if prev is not None and prev.peak_gb and cap is not None and dev.type == "cpu":
            predicted = prev.peak_gb * 2**30 * b / prev.batch_size
            if predicted > cap:
                result.tries.append(BatchTry(b, False, f"predicted peak {predicted / 2**30:.2f} GB > cap "
                                                       f"{cap / 2**30:.2f} GB", predicted / 2**30))
                break
        t = _try_batch(model, make_input, b, dev, backward, cap)
        result.tries.append(t)
        logger.info("batch %d: %s", b, "fits" if t.ok else f"fails ({t.reason})")
        if not t.ok:
            break
        result.max_batch_size, prev = b, t
        if 2 * b > limit:
            result.limit_reached = True
            break
        b *= 2
    return result


def _try_batch(model: nn.Module, make_input: Callable[[int], torch.Tensor], b: int, dev: torch.device,
               backward: bool, cap: float | None) -> BatchTry:
    try:
        with PeakMemory(dev) as mem:
            x = make_input(b)
            out = _step(model, x, backward)
            _sync(dev)
            mem.sample()  # while the input and output are still alive
            del out, x
    except Exception as e:  # only out-of-memory is a failure of the search; anything else is a bug
        if not is_oom(e):
            raise
        return BatchTry(b, False, f"out of memory ({type(e).__name__})")
    finally:
        if dev.type == "cuda":  # give the failed (or finished) batch's blocks back before the next try
            torch.cuda.empty_cache()
    peak = mem.peak_bytes
    if cap is not None and peak > cap:
        return BatchTry(b, False, f"peak {peak / 2**30:.2f} GB > cap {cap / 2**30:.2f} GB", peak / 2**30)
    return BatchTry(b, True, "", peak / 2**30)


# ------------------------------------------------------------------------------------------ comparison
@dataclass
class EfficiencyRow:
    """One input size: its measurements and the ratios to the high-resolution row."""

    input: str
    f: int
    shape: list[int]
    batch_size: int
    latency_ms: float | None
    throughput: float | None
    max_batch_size: int
    max_batch_limit_reached: bool
    latency_speedup: float | None = None   # image latency / this latency
    throughput_ratio: float | None = None  # this throughput / image throughput
    max_batch_ratio: float | None = None   # this max batch / image max batch
    note: str = ""


def per_axis(f: int, spatial_dims: int) -> int:
    """Per-axis reduction ``s`` of a downsizing factor ``f = s**spatial_dims``."""
    s = round(f ** (1 / spatial_dims))
    if s < 1 or s**spatial_dims != f:
        raise ValueError(f"f={f} is not a {spatial_dims}-th power of an integer (f = s² in 2D, s³ in 3D)")
    return s


def compare_efficiency(classifier: str | None = None, spatial_dims: int = 2, image_size: int | None = None,
                       factors: Sequence[int] | None = None, *, batch_size: int = 8, in_channels: int = 1,
                       latent_channels: int = 1, num_classes: int = 1, device: str = "cpu", repeats: int = 5,
                       warmup: int = 2, limit: int = 1024, max_memory_gb: float | None = None,
                       backward: bool = False) -> list[EfficiencyRow]:
    """Latency, throughput and maximum batch size of one classifier on images vs latent-sized inputs.

    Args:
        classifier: see :func:`~medlatent.evaluation.classifiers.build_classifier`; default: the paper's
            (HRNet-w64 in 2D, SEResNet-152 in 3D). ``"tiny"`` for quick CPU runs.
        spatial_dims: 2 or 3.
        image_size: high-resolution size per axis (paper: 1024 in 2D, 256 in 3D).
        factors: downsizing factors ``f`` of the latents (paper: 16 and 64 in 2D, 64 and 512 in 3D).
        batch_size: batch of the latency/throughput measurement (the same for every row).
        in_channels: image channels.
        latent_channels: classifier input channels on latents (1: the paper's 2D channel mean and 3D C=1).
        num_classes: classifier outputs.
        device, repeats, warmup, backward: see :func:`measure_latency`.
        limit, max_memory_gb: see :func:`max_batch_size`.

    Returns:
        The image row first, then one row per factor, with ratios to the image row.
    """
    if spatial_dims not in PAPER_SETTINGS:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    classifier = classifier or PAPER_CLASSIFIER[spatial_dims]
    size_default, factors_default = PAPER_SETTINGS[spatial_dims]
    image_size = image_size or size_default
    factors = list(factors or factors_default)
    inputs = [("image", 1, [in_channels] + [image_size] * spatial_dims)]
    for f in factors:
        s = per_axis(f, spatial_dims)
        if image_size % s:
            raise ValueError(f"image_size {image_size} is not divisible by the per-axis reduction {s} of f={f}")
        inputs.append((f"latent f={f}", f, [latent_channels] + [image_size // s] * spatial_dims))
    models: dict[int, nn.Module] = {}
    rows: list[EfficiencyRow] = []
    for name, f, shape in inputs:
        if shape[0] not in models:
            torch.manual_seed(0)
            models[shape[0]] = build_classifier(classifier, spatial_dims, shape[0], num_classes)
        model = models[shape[0]]
        search = max_batch_size(model, shape, device=device, limit=limit, max_memory_gb=max_memory_gb,
                                backward=backward)
        note = ""
        latency: Latency | None = None
        if search.max_batch_size >= batch_size or search.limit_reached:
            try:
                latency = measure_latency(model, shape, batch_size, device=device, repeats=repeats, warmup=warmup,
                                          backward=backward)
            except Exception as e:
                if not is_oom(e):
                    raise
                note = f"latency: batch {batch_size} ran out of memory"
        else:
            note = f"latency: batch {batch_size} does not fit (max {search.max_batch_size})"
        rows.append(EfficiencyRow(name, f, shape, batch_size, latency.latency_ms if latency else None,
                                  latency.throughput if latency else None, search.max_batch_size,
                                  search.limit_reached, note=note))
        logger.info("%s %s: %s", classifier, name, rows[-1])
    base = rows[0]
    for r in rows:
        if base.latency_ms and r.latency_ms:
            r.latency_speedup = base.latency_ms / r.latency_ms
        if base.throughput and r.throughput:
            r.throughput_ratio = r.throughput / base.throughput
        if base.max_batch_size:
            r.max_batch_ratio = r.max_batch_size / base.max_batch_size
    return rows


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def efficiency_markdown(rows: Sequence[EfficiencyRow], title: str = "CAD model efficiency") -> str:
    lines = [f"# {title}", "",
             "Latency: median ms per batch; throughput: items/s; max batch: largest power of two that fits "
             "(≥ when the search limit was reached). Ratios are relative to the high-resolution image.", "",
             "| Input | f | Shape | Batch | Latency (ms) | Throughput (items/s) | Max batch | Latency ÷ | "
             "Throughput × | Max batch × |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mb = f"≥{r.max_batch_size}" if r.max_batch_limit_reached else str(r.max_batch_size)
        lines.append(f"| {r.input} | {r.f} | {'×'.join(map(str, r.shape))} | {r.batch_size} | {_fmt(r.latency_ms)} | "
                     f"{_fmt(r.throughput, '.1f')} | {mb} | {_fmt(r.latency_speedup, '.1f')} | "
                     f"{_fmt(r.throughput_ratio, '.1f')} | {_fmt(r.max_batch_ratio, '.1f')} |")
    notes = [f"- {r.input}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_efficiency(rows: Sequence[EfficiencyRow], out_dir: str | Path, stem: str = "efficiency",
                     meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv``, ``<stem>.json`` (with ``meta``: classifier, device, …) and
    ``report.md`` (with a throughput bar chart when matplotlib is installed)."""
    from medlatent.io.atomic import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / f"{stem}.md", "csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
    with atomic_write(paths["markdown"]) as tmp:
        tmp.write_text(efficiency_markdown(rows), encoding="utf-8")
    dicts = [asdict(r) for r in rows]
    with atomic_write(paths["csv"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(dicts[0]))
        w.writeheader()
        for d in dicts:
            w.writerow({**d, "shape": "x".join(map(str, d["shape"]))})
    with atomic_write(paths["json"]) as tmp:
        tmp.write_text(json.dumps({"meta": meta or {}, "rows": dicts}, indent=2), encoding="utf-8")
    paths["report"] = _report(rows, out, stem, meta or {})
    return paths


def _report(rows: Sequence[EfficiencyRow], out: Path, stem: str, meta: dict[str, Any]) -> Path:
    """``report.md``: the table and a throughput bar chart (when matplotlib is installed)."""
    from medlatent.evaluation.report import bar_chart, write_report

    figures = []
    summary = {r.input: {"throughput": r.throughput} for r in rows if r.throughput}
    if summary:
        try:
            png = bar_chart(summary, "throughput", out / f"{stem}_throughput.png", ylabel="items / s",
                            title=f"{meta.get('classifier', 'classifier')} throughput")
            figures.append(("Throughput (items/s)", png))
        except ImportError as e:  # matplotlib is optional: the table is the result
            logger.info("no throughput chart (%s)", e)
    table = [{"Input": r.input, "f": r.f, "Shape": r.shape, "Batch": r.batch_size, "Latency (ms)": r.latency_ms,
              "Throughput (items/s)": r.throughput,
              "Max batch": f"≥{r.max_batch_size}" if r.max_batch_limit_reached else str(r.max_batch_size),
              "Latency ÷": r.latency_speedup, "Throughput ×": r.throughput_ratio, "Max batch ×": r.max_batch_ratio}
             for r in rows]
    notes = [", ".join(f"{k}={v}" for k, v in meta.items()),
             "Latency: median ms per batch; max batch: largest power of two that fits; ratios relative to the "
             "high-resolution image (paper Figure 2)."] + [f"- {r.input}: {r.note}" for r in rows if r.note]
    return write_report(out, "CAD model efficiency", [("Images vs latents", table)], figures, notes)
