"""``resolve_backend``: which passes run where, and the first-use check that ``auto`` runs
before it picks the Triton kernels on a device."""

from __future__ import annotations

import logging

import pytest
import torch

from zo_plugins import ZOOptimizer, kernels
from zo_plugins.core import backend


@pytest.fixture
def no_triton(monkeypatch):
    monkeypatch.setattr(
        backend, "_triton_import_error", lambda: "ModuleNotFoundError: No module named 'triton'"
    )


@pytest.fixture
def with_triton(monkeypatch):
    monkeypatch.setattr(backend, "_triton_import_error", lambda: None)
    monkeypatch.setattr(backend, "triton_self_check", lambda device: None)


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


def test_auto_falls_back_with_the_reason_when_the_first_use_check_fails(monkeypatch, caplog):
    monkeypatch.setattr(backend, "_triton_import_error", lambda: None)
    reason = "the first-use check raised RuntimeError: Failed to find C compiler"
    monkeypatch.setattr(backend, "triton_self_check", lambda device: reason)
    assert kernels.resolve_backend("auto", "cuda:1") == "torch"
    p = torch.nn.Parameter(torch.zeros(3))
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 1)))
    with caplog.at_level(logging.WARNING, logger="zo_plugins"):
        name, _, why = backend.select_backend("auto", [backend.ParamSpec(p, "w", 1)])
    assert (name, why) == ("torch", reason)
    assert "not the Triton kernels: " + reason in caplog.text


def test_the_first_use_check_passes_on_the_interpreter_and_catches_a_wrong_kernel(monkeypatch):
    # under TRITON_INTERPRET=1 (this folder's conftest) the kernels run on CPU tensors: the real
    # check compares every pass with PyTorch and must find them equal ...
    assert backend._run_self_check(torch.device("cpu")) is None
    # ... and a kernel that writes a wrong value must be caught, not used
    from zo_plugins.kernels import passes as kp

    real = kp.triton_update_foreach_

    def off_by_one_ulp(specs, **kw):
        real(specs, **kw)
        for s in specs:
            s.param.data.view(-1)[-1:] = torch.nextafter(s.param.data.view(-1)[-1:], torch.tensor(1.0))

    monkeypatch.setattr(kp, "triton_update_foreach_", off_by_one_ulp)
    assert "update pass disagrees" in backend._run_self_check(torch.device("cpu"))


def test_the_first_use_check_reports_an_exception_instead_of_raising(monkeypatch):
    monkeypatch.setattr(backend, "_SELF_CHECK", {})

    def boom(device):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(backend, "_run_self_check", boom)
    assert backend.triton_self_check("cpu") == (
        "the first-use check raised RuntimeError: Failed to find C compiler. Please specify via CC "
        "environment variable."
    )


def test_the_optimizer_records_why_it_chose_its_backend():
    opt = ZOOptimizer([torch.nn.Parameter(torch.zeros(4))], lr=0.1)
    assert (opt.backend, opt.backend_reason) == (
        "torch",
        "the parameters are on cpu and the Triton kernels run on CUDA",
    )
