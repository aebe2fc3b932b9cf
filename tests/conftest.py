"""Fixtures shared by the suite; helpers live in zo_testing.py (a unique module name, so the
kernels' own conftest.py cannot shadow them)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from zo_testing import _mlp64  # noqa: E402


@pytest.fixture
def mlp64():
    return _mlp64()
