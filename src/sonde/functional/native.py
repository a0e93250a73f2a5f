"""The fused CPU kernel behind the tensor statistics: one pass for all nine and a histogram.

Torch has no single operation that yields a tensor's sum, sum of squares, extremes, absolute
sum, zero count and histogram together; composed from its reductions they cost about a dozen
passes and a few hundred dispatches per step. ``_summary.c`` does it in one pass, vectorised,
over a small thread pool, reading a parameter's update (after − before) without materialising
it and copying a parameter into its snapshot buffer as it goes.

The kernel is compiled on first use with the system's C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) for this CPU (``-march=native``), with OpenMP, and cached under
``$SONDE_CACHE_DIR`` (default ``~/.cache/sonde``), keyed by the source, the compiler and the
CPU. Without a compiler, or with ``SONDE_NATIVE=0``, :func:`summarize` returns None and sonde
uses torch reductions instead (same results, about four times the per-step overhead), saying so once.

Example:
    >>> import torch
    >>> result = summarize(torch.tensor([0.0, 1.0, 2.0, 3.0]), histogram=(0.0, 3.0, 3))
    >>> result is None or (result[0][6], result[1].tolist()) == (6.0, [1, 1, 2])
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["available", "disabled", "summarize"]

log = logging.getLogger("sonde")

SOURCES = (Path(__file__).with_name("_summary.c"), Path(__file__).with_name("_hist64.c"))
MAX_BINS = 64  # the bit-sliced histogram's limit; more bins are counted by torch
_FLAGS = ("-O3", "-shared", "-fPIC")
# Best first: OpenMP threads and this CPU's vector width, then without each.
_VARIANTS = (("-fopenmp", "-march=native"), ("-march=native",), ())

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


def _cache_dir() -> Path:
    if os.environ.get("SONDE_CACHE_DIR"):
        return Path(os.environ["SONDE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sonde"


def build_library(stem: str, sources: Sequence[Path] = SOURCES, *, generated: Sequence[str] = (),
                  flags: Sequence[str] = (), key: Sequence[bytes] = ()) -> tuple[Path | None, list[str]]:
    """Compile C ``sources`` (and the ``generated`` source texts) into a shared library cached as
    ``<cache>/<stem>-<hash>.so``, keyed by the sources, ``key``, the compiler and the CPU; the
    cached one when it exists. Tries the flag variants best first (OpenMP, ``-march=native``).

    Returns the library's path, or None and what each compiler call said.
    """
    compiler = _compiler()
    if compiler is None:
        return None, ["no C compiler found (set CC=...)"]
    parts = [*(text.encode() for text in generated), *(path.read_bytes() for path in sources), *key,
             compiler.encode(), _cpu_identity().encode(), platform.machine().encode()]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = _cache_dir() / f"{stem}-{digest}.so"
    if target.exists():
        return target, []
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        written = []
        for i, text in enumerate(generated):
            written.append(Path(tmp, f"generated{i}.c"))
            written[-1].write_text(text)
        for variant in _VARIANTS:  # some compilers lack OpenMP (Apple clang) or -march=native
            built = Path(tmp, "built.so")
            cmd = [compiler, *_FLAGS, *variant, *flags, *map(str, [*written, *sources]), "-o", str(built), "-lm"]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            if result.returncode == 0:
                os.replace(built, target)  # atomic: concurrent builds never see half a library
                return target, []
            errors.append(f"{' '.join(cmd)}: {result.stderr.strip()[-500:]}")
    return None, errors


def _build() -> ctypes.CDLL | None:
    if os.environ.get("SONDE_NATIVE", "1") == "0":
        return None
    if _compiler() is None:
        log.warning("sonde: no C compiler found (set CC=...); tensor statistics use torch reductions, "
                    "with about four times the per-step overhead")
        return None
    target, errors = build_library("summary")
    if target is None:
        log.warning("sonde: compiling the tensor-statistics kernel failed; using torch reductions "
                    "(about four times the per-step overhead):\n%s", "\n".join(errors))
        return None
    lib = ctypes.CDLL(str(target))
    fn = lib.sonde_summarize
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32,
        ctypes.c_float, ctypes.c_float, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
    ]
    fn.restype = ctypes.c_int
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _build()
                except Exception as exc:  # noqa: BLE001 - a missing kernel only costs speed
                    log.warning("sonde: the tensor-statistics kernel is unavailable (%s: %s); using torch "
                                "reductions", type(exc).__name__, exc)
                    _lib = None
                _tried = True
    return _lib


def available() -> bool:
    """Whether the compiled kernel is in use (building it on first call)."""
    return _load() is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside the block, :func:`summarize` declines and sonde uses torch reductions, as on a
    machine without a C compiler (for tests and benchmarks of that path)."""
    global _lib, _tried
    with _lock:
        saved = _tried, _lib
        _tried, _lib = True, None
    try:
        yield
    finally:
        with _lock:
            _tried, _lib = saved


def _eligible(t: torch.Tensor) -> bool:
    return t.is_cpu and t.dtype == torch.float32 and t.is_contiguous()


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one block of memory from ``data_ptr()`` (contiguous, or
    permuted such as channels_last): order does not matter to a summary of all of them."""
    if not (t.is_cpu and t.dtype == torch.float32):
        return False
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted(zip(t.stride(), t.shape, strict=True)):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def summarize(
    x: torch.Tensor,
    *,
    minus: torch.Tensor | None = None,
    copy_to: torch.Tensor | None = None,
    histogram: tuple[float, float, int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Raw summary partials of ``x`` (or ``x - minus``) and histogram counts, in one pass.

    Returns ``(raw, counts)`` with ``raw`` the ten partials of
    :func:`sonde.functional.summarize_raw` as a float64 vector and ``counts`` int64 (None
    without ``histogram=(lo, hi, bins)``), or None when the kernel is unavailable or the
    tensors are not float32 on the CPU, laid out densely (contiguous, or any permutation of it
    when ``x`` is read alone), in which case the caller uses torch. ``copy_to`` (not with
    ``minus``) receives a copy of ``x``.
    """
    lib = _lib if _tried else _load()
    if lib is None:
        return None
    n = x.numel()
    if n == 0 or (minus is not None and copy_to is not None):
        return None
    if not (_dense(x) if minus is None and copy_to is None else _eligible(x)):
        return None
    if minus is not None and not (_eligible(minus) and minus.shape == x.shape):
        return None
    if copy_to is not None and not (_eligible(copy_to) and copy_to.numel() == n):
        return None
    bins, lo, scale = 0, 0.0, 0.0
    if histogram is not None:
        lo, hi, bins = histogram
        if not (0 < bins <= MAX_BINS and hi > lo):
            return None
        scale = bins / (hi - lo)
    buffer = np.empty(10 + bins, dtype=np.float64)  # the partials, then the counts (int64)
    address = buffer.__array_interface__["data"][0]
    failed = lib.sonde_summarize(
        x.data_ptr(), None if minus is None else minus.data_ptr(), None if copy_to is None else copy_to.data_ptr(),
        n, bins, lo, scale, torch.get_num_threads(), address, address + 80 if bins else None,
    )
    if failed:
        return None
    return buffer[:10], buffer[10:].view(np.int64) if bins else None
