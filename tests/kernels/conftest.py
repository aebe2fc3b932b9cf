"""Kernel tests run the Triton kernels on CPU tensors through the Triton interpreter.

``TRITON_INTERPRET`` is read when a function is decorated with ``@triton.jit``, so it must be set
before ``zo_plugins.kernels.passes`` is first imported: this conftest is loaded before the test
modules of this folder are collected.  The interpreter costs ~0.35 us per element: keep tensors
small.  Shared helpers live in ``kernel_helpers.py``.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"
