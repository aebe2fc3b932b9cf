"""Kernel tests run the Triton kernels on CPU tensors through the Triton interpreter.

``TRITON_INTERPRET`` is read when a function is decorated with ``@triton.jit``, so it must be set
before ``zo_plugins.kernels.passes`` is first imported: this conftest is loaded before the test
modules of this folder are collected.  The interpreter costs ~0.35 us per element: keep tensors
small.  Shared helpers live in ``kernel_helpers.py``.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

# Decorate every kernel module now, under the interpreter: a module first imported later --
# e.g. inside a test that sets TRITON_INTERPRET=0 to check the CPU refusal -- would hold compiled
# (non-interpreted) kernels for the rest of the session.
try:
    import triton  # noqa: F401
except ImportError:  # the kernel tests skip themselves
    pass
else:
    import zo_plugins.kernels.passes  # noqa: F401,E402
    import zo_plugins.kernels.rules  # noqa: F401,E402
