"""Switch one llama.cpp context's CPU backend to its reference kernels.

llama.cpp's CPU backend has a switch, ``ggml_backend_cpu_set_use_ref``, that makes every
graph use the plain ("reference") kernels: flash attention then always runs the per-row
kernel (never the tiled one for >= 64 query rows of a stream, never the KV-split one for
a lone token), the tiled K-quant matrix product is off and so is operator fusion. A
token's result then depends on the tokens before it and not on how its step was shaped,
which is what tep's exact mode needs (docs/DETERMINISM.md).

llama.cpp's public API does not hand out a context's backend, so it is found in the
context object itself, and only trusted after checks that do not depend on guessing:

1. ``llama_set_abort_callback`` writes two values we choose (a function address and a
   buffer address) into the context; the first place from the context's address on
   that holds both, in that order, is its ``abort_callback`` member (the CPU backend
   keeps a copy too, in its own allocation, which cannot lie inside the context object).
   Then the values are reset to NULL.
2. In llama.cpp's ``llama_context`` the members before it are ``backend_cpu``, the
   ``backends`` vector, ``opt_ctx``, ``threadpool`` and ``threadpool_batch``; the one
   after it is the ``set_n_threads_fns`` vector. The candidate ``backend_cpu`` must be the
   last element of ``backends`` and the backend of one of ``set_n_threads_fns``' pairs.
3. Its GUID must be the CPU backend's (``ggml_backend_is_cpu``, called only after the
   memory it reads was read safely).

All memory is read through ``/proc/self/mem``, which answers an error for an unmapped
address instead of faulting. Any failed check leaves the context as it was and returns
the reason; the caller then falls back to exact mode's feeding rules.
"""
from __future__ import annotations

import ctypes
import os
import struct
import sys

__all__ = ["use_reference_kernels"]

_WORD = 8
_SCAN_BYTES = 64 * 1024   # a llama_context is a few KB; the member lies in its first part
# offsets from the abort_callback member (bytes), from llama.cpp's llama_context layout
_BACKEND_CPU = -56        # ggml_backend_t backend_cpu
_BACKENDS = -48           # std::vector<ggml_backend_ptr> backends: begin, end, capacity
_SET_N_THREADS = 16       # std::vector<std::pair<ggml_backend_t, fn>> set_n_threads_fns
_MAX_BACKENDS = 64


def _read(addr: int, n: int) -> bytes:
    """Up to ``n`` bytes at ``addr`` of this process (fewer where a page is unmapped)."""
    out = b""
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        while len(out) < n:
            try:
                part = os.pread(fd, min(4096 - (addr + len(out)) % 4096, n - len(out)),
                                addr + len(out))
            except OSError:
                break
            if not part:
                break
            out += part
    finally:
        os.close(fd)
    return out


def _word(addr: int) -> int | None:
    b = _read(addr, _WORD)
    return struct.unpack("<Q", b)[0] if len(b) == _WORD else None


def _cpu_library() -> ctypes.CDLL | str:
    """The ggml CPU backend library this process already loaded (the same handle)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f
                     if len(line.split(None, 5)) == 6}
    except OSError as e:
        return f"cannot read /proc/self/maps: {e}"
    cpu = sorted(p for p in paths if os.path.basename(p).startswith("libggml-cpu"))
    if len(cpu) != 1:
        return f"expected one loaded ggml CPU library, found {cpu or 'none'}"
    lib = ctypes.CDLL(cpu[0])
    if not hasattr(lib, "ggml_backend_cpu_set_use_ref"):
        return "this llama.cpp build has no ggml_backend_cpu_set_use_ref"
    return lib


def _find_cpu_backend(llama_lib: ctypes.CDLL, cpu: ctypes.CDLL, ctx: int) -> int | str:
    set_abort = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
        ctypes.cast(llama_lib.llama_set_abort_callback, ctypes.c_void_p).value)
    # two values nothing else in the context holds side by side: a function address
    # (never called: the callback is reset before this returns, and no decode runs
    # meanwhile) and the address of a buffer owned here
    fn = ctypes.cast(cpu.ggml_backend_is_cpu, ctypes.c_void_p).value
    mark = ctypes.create_string_buffer(16)
    data = ctypes.addressof(mark)
    set_abort(ctx, fn, data)
    try:
        mem = _read(ctx, _SCAN_BYTES)
    finally:
        set_abort(ctx, None, None)
    # the first match: the backend's own copy of the two values (its context struct)
    # is another allocation, so it can only come after the llama_context object
    pattern = struct.pack("<QQ", fn, data)
    at = mem.find(pattern)
    while at >= 0 and at % _WORD:
        at = mem.find(pattern, at + 1)
    if at < 0 or at + _BACKEND_CPU < 0:
        return "the abort callback was not found in the context"

    def member(off: int) -> int:
        return struct.unpack_from("<Q", mem, at + off)[0]

    backend = member(_BACKEND_CPU)
    begin, end = member(_BACKENDS), member(_BACKENDS + _WORD)
    if not (backend and begin and end > begin and (end - begin) % _WORD == 0
            and (end - begin) // _WORD <= _MAX_BACKENDS):
        return "the backends vector is not where this llama.cpp build keeps it"
    if _word(end - _WORD) != backend:
        return "backend_cpu is not the last of the context's backends"
    if at + _SET_N_THREADS + 2 * _WORD > len(mem):
        return "the context is shorter than expected"
    begin, end = member(_SET_N_THREADS), member(_SET_N_THREADS + _WORD)
    n_pairs = (end - begin) // (2 * _WORD) if end > begin else 0
    if not 0 < n_pairs <= _MAX_BACKENDS or (end - begin) % (2 * _WORD):
        return "the set_n_threads_fns vector is not where expected"
    pairs = _read(begin, end - begin)
    if len(pairs) != end - begin or backend not in struct.unpack(f"<{2 * n_pairs}Q", pairs)[::2]:
        return "backend_cpu has no thread-count setter"
    guid = _word(backend)
    if guid is None or len(_read(guid, 16)) != 16:
        return "the candidate backend's GUID cannot be read"
    cpu.ggml_backend_is_cpu.argtypes = [ctypes.c_void_p]
    cpu.ggml_backend_is_cpu.restype = ctypes.c_bool
    if not cpu.ggml_backend_is_cpu(backend):
        return "the candidate backend is not llama.cpp's CPU backend"
    return backend


def use_reference_kernels(llama_lib: ctypes.CDLL, ctx: int | ctypes.c_void_p) -> str | None:
    """Make the CPU backend of llama.cpp context ``ctx`` run its reference kernels.

    Args:
        llama_lib: llama-cpp-python's loaded ``libllama`` (``llama_cpp.llama_cpp._lib``).
        ctx: the ``llama_context *`` (a freshly created one, no decode running).

    Returns:
        None when the switch is on; otherwise why it could not be switched (the context
        is then unchanged).
    """
    if not os.path.exists("/proc/self/mem"):
        return "no /proc/self/mem on this platform"
    if ctypes.sizeof(ctypes.c_void_p) != _WORD or sys.byteorder != "little":
        return "the layout checks assume a 64-bit little-endian process"
    address = ctypes.cast(ctx, ctypes.c_void_p).value if not isinstance(ctx, int) else ctx
    if not address:
        return "no context"
    cpu = _cpu_library()
    if isinstance(cpu, str):
        return cpu
    found = _find_cpu_backend(llama_lib, cpu, address)
    if isinstance(found, str):
        return found
    cpu.ggml_backend_cpu_set_use_ref.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    cpu.ggml_backend_cpu_set_use_ref.restype = None
    cpu.ggml_backend_cpu_set_use_ref(found, True)
    return None
