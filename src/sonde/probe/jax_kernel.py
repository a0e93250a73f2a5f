"""sonde's fused statistics kernel as an XLA custom call, for statistics taken inside a jitted
JAX step on the CPU.

The kernel of :mod:`sonde.functional.native` (one vectorised pass over a float32 tensor for the
ten raw partials of :func:`sonde.functional.summarize_raw` and a histogram of up to 64 bins) is
wrapped in an XLA FFI handler written against XLA's C API (``xla/ffi/api/c_api.h``, shipped with
jaxlib) and registered as the CPU target ``sonde_summarize``. Called with :func:`partials` from a
traced step, it reads XLA's own buffers in place: no array is copied or handed to Python, and
only ``2 × (11 + bins)`` 32-bit words come out (the float64 partials and int64 counts, bit for
bit, and the float32 extremes). XLA's own reductions (``jnp``) take several times longer per element on the CPU.

The handler is compiled on first use with the C compiler and flags of
:mod:`sonde.functional.native`, and cached beside its library; without a compiler, headers, or
with ``SONDE_NATIVE=0``, :func:`available` is False and the caller keeps another path.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sonde.functional import native

__all__ = ["MAX_BINS", "available", "extremes", "partials", "unpack"]

log = logging.getLogger("sonde")

MAX_BINS = native.MAX_BINS
TARGET = "sonde_summarize"

_HANDLER = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "xla/ffi/api/c_api.h"

int sonde_summarize(const float *x, const float *y, float *copy_to, int64_t n, int32_t bins,
                    float hlo, float hscale, int32_t threads, double *out, int64_t *hist);

static XLA_FFI_Error *fail(XLA_FFI_CallFrame *frame, const char *message) {
    XLA_FFI_Error_Create_Args args;
    memset(&args, 0, sizeof args);
    args.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE;
    args.message = message;
    args.errc = XLA_FFI_Error_Code_INVALID_ARGUMENT;
    return frame->api->XLA_FFI_Error_Create(&args);
}

static int64_t count(const XLA_FFI_Buffer *b) {
    int64_t n = 1;
    for (int64_t i = 0; i < b->rank; i++) n *= b->dims[i];
    return n;
}

/* args: x (f32), minus (f32, empty or as many elements as x), spec (f32[6]: [known, lo, hi,
 * scale, threads, wanted]); result: u32[2 * (11 + bins)]: the float64 partials, the int64
 * counts, then the float32 min and max; zeros, reading nothing, when wanted == 0.
 * known > 0: count over [lo, hi) with bins / (hi - lo) = scale (no counts unless scale is finite
 * and positive); known == 0: over the tensor's own min..max, when that range is finite and not empty. */
XLA_FFI_Error *sonde_xla_summarize(XLA_FFI_CallFrame *frame) {
    XLA_FFI_Extension_Base *ext = frame->extension_start;
    if (ext != NULL && ext->type == XLA_FFI_Extension_Metadata) {
        XLA_FFI_Metadata *metadata = ((XLA_FFI_Metadata_Extension *)ext)->metadata;
        metadata->api_version.major_version = XLA_FFI_API_MAJOR;
        metadata->api_version.minor_version = XLA_FFI_API_MINOR;
        metadata->traits = 0;
        return NULL;
    }
    if (frame->stage != XLA_FFI_ExecutionStage_EXECUTE) return NULL;
    if (frame->args.size != 3 || frame->rets.size != 1) return fail(frame, "sonde_summarize: 3 arguments, 1 result");
    for (int i = 0; i < 3; i++)
        if (frame->args.types[i] != XLA_FFI_ArgType_BUFFER) return fail(frame, "sonde_summarize: buffers only");
    XLA_FFI_Buffer *x = frame->args.args[0], *minus = frame->args.args[1], *spec = frame->args.args[2];
    XLA_FFI_Buffer *result = frame->rets.rets[0];
    int64_t n = count(x), words = count(result);
    if (x->dtype != XLA_FFI_DataType_F32 || minus->dtype != XLA_FFI_DataType_F32
        || spec->dtype != XLA_FFI_DataType_F32 || count(spec) != 6 || result->dtype != XLA_FFI_DataType_U32
        || words < 22 || words % 2 || (count(minus) != 0 && count(minus) != n))
        return fail(frame, "sonde_summarize: unexpected shapes or types");
    const float *s = spec->data;
    const float *y = count(minus) ? minus->data : NULL;
    int32_t bins = (int32_t)(words / 2 - 11), threads = (int32_t)s[4];
    double *out = result->data;
    if (s[5] == 0.0f) {  /* a step the schedule does not record */
        memset(out, 0, sizeof(uint32_t) * words);
        return NULL;
    }
    int64_t *hist = bins ? (int64_t *)(out + 10) : NULL;
    if (bins) memset(hist, 0, sizeof(int64_t) * bins);
    float lo = s[1], scale = s[3];
    if (bins && s[0] <= 0.0f) {  /* the tensor's own range: a first pass finds it */
        if (sonde_summarize(x->data, y, NULL, n, 0, 0.0f, 0.0f, threads, out, NULL))
            return fail(frame, "sonde_summarize: bins out of range");
        float first_lo = (float)out[4], first_hi = (float)out[5];
        if (!(isfinite(first_lo) && isfinite(first_hi) && first_hi > first_lo)) bins = 0, hist = NULL;
        else lo = first_lo, scale = (float)bins / (first_hi - first_lo);
    }
    if (bins && !(isfinite(scale) && scale > 0.0f)) bins = 0, hist = NULL;
    if (sonde_summarize(x->data, y, NULL, n, bins, lo, scale, threads, out, hist))
        return fail(frame, "sonde_summarize: bins out of range");
    float range[2] = {(float)out[4], (float)out[5]};
    memcpy((uint32_t *)result->data + words - 2, range, sizeof range);
    return NULL;
}
"""

_lock = threading.Lock()
_ready: bool | None = None


def _build() -> bool:
    """Compile (or find cached) and register the handler; False when it cannot be had."""
    if os.environ.get("SONDE_NATIVE", "1") == "0" or native._load() is None:
        return False
    compiler = native._compiler()
    include = jax.ffi.include_dir()
    header = Path(include, "xla", "ffi", "api", "c_api.h")
    if compiler is None or not header.exists():
        return False
    target, errors = native.build_library("jax-summary", generated=[_HANDLER], flags=[f"-I{include}"],
                                          key=[header.read_bytes()])
    if target is None:
        log.warning("sonde: compiling the JAX statistics handler failed; JAX arrays cross to the "
                    "host for their statistics:\n%s", "\n".join(errors))
        return False
    lib = ctypes.CDLL(str(target))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.sonde_xla_summarize), platform="cpu")
    return True


def available() -> bool:
    """Whether the custom call is registered (compiling it on first call)."""
    global _ready
    if _ready is None:
        with _lock:
            if _ready is None:
                try:
                    _ready = _build()
                except Exception as exc:  # noqa: BLE001 - a missing handler only costs speed
                    log.warning("sonde: the JAX statistics handler is unavailable (%s: %s)", type(exc).__name__, exc)
                    _ready = False
    return _ready


def partials(x: Any, minus: Any, spec: Any, bins: int, wanted: Any = True) -> Any:
    """Traced: ``x``'s (or ``x - minus``'s) raw partials and ``bins`` histogram counts as
    ``uint32[2 * (11 + bins)]`` (:func:`unpack` reads them), computed where ``x`` lies.

    ``spec`` is the float32 edge row ``[known, lo, hi, bins / (hi - lo)]``: unknown edges count
    over the tensor's own range. ``x`` and ``minus`` must be float32. Where ``wanted`` (traced)
    is false the call reads nothing and returns zeros: a step can call it outside any branch, so
    that ``x`` never becomes a branch's operand, which XLA's CPU conditionals pay for by size."""
    jnp = jax.numpy
    row = jnp.concatenate([jnp.asarray(spec, jnp.float32).reshape(4), jnp.full(1, _threads(), jnp.float32),
                           jnp.asarray(wanted, jnp.float32).reshape(1)])
    empty = jnp.zeros(0, jnp.float32)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((2 * (11 + bins),), jnp.uint32))
    return call(jnp.ravel(x), empty if minus is None else jnp.ravel(minus), row)


def extremes(words: Any) -> tuple[Any, Any]:
    """Traced: the float32 (min, max) of a :func:`partials` result."""
    pair = jax.lax.bitcast_convert_type(words[-2:], jax.numpy.float32)
    return pair[0], pair[1]


def unpack(words: Any) -> tuple[np.ndarray, np.ndarray]:
    """The host side of :func:`partials`: the ten float64 partials and the int64 counts."""
    data = np.ascontiguousarray(np.asarray(words, np.uint32))
    return data[:20].view(np.float64), data[20:-2].view(np.int64)


def _threads() -> int:
    import torch  # the kernel shares torch's thread budget, as on the host

    return max(1, torch.get_num_threads())
