"""Finding a llama.cpp context's CPU backend (tep.backends.llamacpp_reference): memory is
read without ever faulting, and what is not a context is refused before llama.cpp is
called. That the switch is found, and changes what runs, on the real model:
test_determinism_llamacpp."""
from __future__ import annotations

import ctypes
import mmap

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from tep.backends import llamacpp_reference as ref  # noqa: E402


def test_reads_stop_at_an_unmapped_page_instead_of_faulting():
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, 2 * page)
    view = (ctypes.c_char * (2 * page)).from_buffer(buf)
    try:
        addr = ctypes.addressof(view)
        buf[page - 8:page] = b"ABCDEFGH"
        libc = ctypes.CDLL(None)
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        assert libc.munmap(addr + page, page) == 0
        assert ref._read(addr + page - 8, 16) == b"ABCDEFGH"   # the mapped part only
        assert ref._read(addr + page, 8) == b""
        assert ref._word(addr + page) is None
        assert ref._word(addr + page - 8) == int.from_bytes(b"ABCDEFGH", "little")
        assert ref._read(0, 64) == b""
    finally:
        del view
        buf.close()


def test_no_context_is_refused_before_llama_cpp_is_called():
    lib = llama_cpp.llama_cpp._lib
    assert ref.use_reference_kernels(lib, None) == "no context"
    assert ref.use_reference_kernels(lib, 0) == "no context"
    assert ref.use_reference_kernels(lib, ctypes.c_void_p()) == "no context"


def test_the_loaded_cpu_library_is_found():
    lib = ref._cpu_library()
    assert not isinstance(lib, str), lib
    assert hasattr(lib, "ggml_backend_cpu_set_use_ref")
