"""``resolve_backend``: which passes run where (no Triton needed for these tests)."""

from __future__ import annotations

import pytest

from zo_plugins import kernels
from zo_plugins.kernels import backend


@pytest.fixture
def no_triton(monkeypatch):
    monkeypatch.setattr(
        backend, "_triton_import_error", lambda: "ModuleNotFoundError: No module named 'triton'"
    )


@pytest.fixture
def with_triton(monkeypatch):
    monkeypatch.setattr(backend, "_triton_import_error", lambda: None)


def test_auto_is_torch_on_cpu(with_triton):
    assert kernels.resolve_backend("auto", "cpu") == "torch"


def test_auto_is_triton_on_cuda_when_importable(with_triton):
    assert kernels.resolve_backend("auto", "cuda:0") == "triton"


def test_auto_falls_back_to_torch_without_triton(no_triton):
    assert kernels.resolve_backend("auto", "cuda") == "torch"


def test_torch_is_always_torch(no_triton):
    assert kernels.resolve_backend("torch", "cuda") == "torch"


def test_explicit_triton_without_triton_names_the_install_line(no_triton):
    with pytest.raises(ImportError, match=r"pip install 'zo-plugins\[triton\]'"):
        kernels.resolve_backend("triton", "cuda")


def test_kernel_entry_points_without_triton_name_the_install_line(no_triton):
    with pytest.raises(ImportError, match=r"pip install 'zo-plugins\[triton\]'"):
        kernels.triton_perturb_  # noqa: B018 - the lazy attribute access is what is tested


def test_explicit_triton_on_cpu_needs_the_interpreter(with_triton, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"runs on CUDA devices; the parameters are on cpu"):
        kernels.resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.resolve_backend("triton", "cpu") == "triton"


def test_unknown_backend_is_rejected():
    with pytest.raises(
        ValueError, match=r"backend='cuda' is invalid: use one of \('auto', 'triton', 'torch'\)"
    ):
        kernels.resolve_backend("cuda", "cpu")


def test_real_triton_detection_matches_import():
    try:
        import triton  # noqa: F401

        expected = True
    except ImportError:
        expected = False
    assert kernels.triton_available() is expected
