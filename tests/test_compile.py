"""`pfq.compile.compile_lowered`: the whole-step compile on a thread with a large native stack."""

import ctypes
import ctypes.util
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfq.compile import STACK_BYTES, compile_lowered


def _native_stack_size() -> int:
    """This thread's stack size as the C library reports it (glibc's pthread_getattr_np)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.pthread_self.restype = ctypes.c_ulong
    attr = ctypes.create_string_buffer(256)  # larger than any pthread_attr_t
    size = ctypes.c_size_t()
    assert libc.pthread_getattr_np(ctypes.c_ulong(libc.pthread_self()), attr) == 0
    try:
        assert libc.pthread_attr_getstacksize(attr, ctypes.byref(size)) == 0
    finally:
        libc.pthread_attr_destroy(attr)
    return size.value


def test_compiles_the_same_program_and_restores_the_thread_stack_size():
    before = threading.stack_size()
    compiled = compile_lowered(jax.jit(lambda x: jnp.sin(x) * 2).lower(jnp.zeros(3)))
    np.testing.assert_allclose(compiled(jnp.arange(3.0)), np.sin(np.arange(3.0)) * 2, rtol=1e-6)
    assert threading.stack_size() == before  # later threads get the usual size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the stack size with glibc's pthread_getattr_np")
def test_the_compile_runs_on_a_large_stack_and_its_error_reaches_the_caller():
    seen = {}

    class Probe:
        def compile(self):
            seen["thread"] = threading.current_thread()
            seen["stack"] = _native_stack_size()
            raise RuntimeError("compiler failed")

    with pytest.raises(RuntimeError, match="compiler failed"):
        compile_lowered(Probe())
    assert seen["thread"] is not threading.main_thread()
    assert seen["stack"] >= STACK_BYTES > 8 * _native_stack_size()  # far above this (main) thread's
