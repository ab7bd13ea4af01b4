"""Triton's interpreter for the kernel tests on the CPU: whether it is on, the skip mark for tests
that need it, and the autouse fixture a test module imports to run kernels under Triton 3.6's
interpreter with NumPy 2.4:

    PYTHONPATH=$PWD/runtime:/work/triton-pkgs TRITON_INTERPRET=1 pytest -q runtime/tests/test_gemv.py

Without triton, or with the interpreter off, the kernel cases are skipped (a GPU runs them in the
test_cuda*.py files)."""

from __future__ import annotations

import os

import pytest

try:
    import triton  # noqa: F401

    INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
except ImportError:
    INTERPRETER = False

needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="needs triton with TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _interpreter_scalars(monkeypatch):
    """Triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a loop bound with
    int(array), which NumPy 2.4 refuses; take its one element instead."""
    if not INTERPRETER:
        return
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)
