"""Backend dispatch, in one place: which implementation runs the passes for a set of tensors.

Two backends share one set of keyword-only signatures (``Passes``, the contract of
``core.passes`` / ``core.updates``):

* ``"torch"`` -- the PyTorch passes of ``core.passes`` and ``core.updates`` (any device);
* ``"triton"`` -- the fused kernels of ``zo_plugins.kernels`` (CUDA; CPU only under
  ``TRITON_INTERPRET=1``, for tests).  The kernels import the core, never the reverse:
  ``zo_plugins.kernels`` registers a loader here (``register_backend``), which imports Triton
  and the kernel modules only when this backend is chosen.

``backend="auto"`` chooses Triton for CUDA tensors only after a **first-use check** on that
device: a few small tensors of odd sizes go through every Triton pass and the PyTorch pass,
and the Rademacher results must agree bit for bit.  Any failure -- Triton missing, no C
compiler for its host launcher, a kernel that does not compile for the GPU, a wrong result --
falls back to PyTorch with the reason logged once per device.  ``backend_reason`` says why a
backend was chosen.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import NamedTuple

import torch

from .passes import ParamSpec, perturb_, perturbed_copy, update_
from .registry import BACKENDS
from .updates import rule_update_

__all__ = [
    "BACKENDS",
    "register_backend",
    "TRITON_INSTALL_HINT",
    "Passes",
    "TORCH_PASSES",
    "triton_available",
    "require_triton",
    "resolve_backend",
    "select_backend",
    "triton_self_check",
    "passes_for_masks",
]

logger = logging.getLogger("zo_plugins")

TRITON_INSTALL_HINT = "pip install 'zo-plugins[triton]'"


class Passes(NamedTuple):
    """One backend's passes, all with the keyword-only signatures of ``core.passes``;
    ``update_group`` and ``rule_group`` take a param group's specs at once (one launch per
    dtype on the Triton backend)."""

    perturb: Callable[..., None]
    copy: Callable[..., torch.Tensor]
    update: Callable[..., None]
    update_group: Callable[..., None]
    rule_group: Callable[..., None]


def _torch_update_group(specs: Sequence[ParamSpec], *, restore, update, decay: float, **kw) -> None:
    """``update_`` per spec; the restore terms go to the in-place specs only."""
    for spec in specs:
        mine = restore if spec.in_place else []
        if mine or update or decay:
            update_(spec, restore=mine, update=update, decay=decay, **kw)


def _torch_rule_group(specs: Sequence[ParamSpec], *, restore, states, steps, **kw) -> None:
    for spec, state, t in zip(specs, states, steps):
        rule_update_(spec, restore=restore if spec.in_place else [], state=state, adam_step=t, **kw)


TORCH_PASSES = Passes(perturb_, perturbed_copy, update_, _torch_update_group, _torch_rule_group)


# --------------------------------------------------------------------------- availability
@lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # noqa: BLE001 - a broken install counts as missing, with its reason
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    """True if ``triton`` imports (checked once per process)."""
    return _triton_import_error() is None


def require_triton() -> None:
    """Raise ``ImportError`` naming the install line if Triton cannot be imported."""
    err = _triton_import_error()
    if err is not None:
        raise ImportError(
            f"backend='triton' needs the triton package, which could not be imported ({err}). "
            f"Install it with: {TRITON_INSTALL_HINT}  -- or use backend='torch'."
        )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_LOADERS: dict[str, Callable[[], Passes]] = {}


def register_backend(name: str, loader: Callable[[], Passes]) -> None:
    """Register the loader of a backend's passes (``zo_plugins.kernels`` registers
    ``"triton"`` when it is imported; the loader runs on first use)."""
    if name in ("auto", "torch"):
        raise ValueError(f"backend {name!r} is built in and cannot be replaced.")
    _LOADERS[name] = loader


def _triton_passes() -> Passes:
    """The Triton backend's passes, from the loader ``zo_plugins.kernels`` registered."""
    if "triton" not in _LOADERS:  # zo_plugins/__init__ imports zo_plugins.kernels, which registers it
        raise ImportError(
            f"The Triton backend is not registered: import zo_plugins.kernels ({TRITON_INSTALL_HINT})."
        )
    return _LOADERS["triton"]()


# --------------------------------------------------------------------------- first-use check
_SELF_CHECK: dict[str, str | None] = {}


def triton_self_check(device: torch.device | str) -> str | None:
    """Run every Triton pass once on ``device`` against the PyTorch pass (Rademacher
    directions: bit-identical by definition) and return ``None`` if all agree, else the
    reason they cannot be used.  Cached per device; never raises."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in _SELF_CHECK:
        try:
            _SELF_CHECK[key] = _run_self_check(device)
        except Exception as exc:  # noqa: BLE001 - any failure means: do not use the kernels here
            _SELF_CHECK[key] = f"the first-use check raised {type(exc).__name__}: {exc}"
    return _SELF_CHECK[key]


def _run_self_check(device: torch.device) -> str | None:
    """Every Triton pass against the PyTorch pass, Rademacher directions, on several tensors per
    launch (the kernels' tensor bisection): odd sizes (whole tiles and a partial one; the CUDA
    tiles are 2048 / 4096 elements), a frozen element, in fp32, bf16 (also a view at an odd
    storage offset: the unaligned, scalar path) and fp16 (the hardware's round-to-nearest)."""
    err = _triton_import_error()
    if err is not None:
        return f"triton does not import ({err}); {TRITON_INSTALL_HINT}"
    tp = _triton_passes()
    gen = torch.Generator().manual_seed(0)
    kw = dict(distribution="rademacher", chunk_size=1 << 16)
    terms = [(11, 1e-3), (12, -2e-3)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sizes = (1, 300, 8197) + ((4099,) if dtype == torch.bfloat16 else ())
        ours, ref = [], []
        for i, numel in enumerate(sizes):
            offset = 1 if i == 3 else 0  # a contiguous view 2 bytes past an aligned address
            theta = (torch.randn(numel + offset, generator=gen) * 0.02).to(dtype).to(device)[offset:]
            frozen = (0,) if numel > 1 else ()
            ours.append(ParamSpec(theta, f"check.{numel}", 0x5E1F + numel, frozen))
            ref.append(ParamSpec(theta.clone(), f"check.{numel}", 0x5E1F + numel, frozen))
        what = f"on {device} ({dtype}, sizes {sizes})"

        def same(a: list[ParamSpec], b: list[ParamSpec]) -> bool:
            return all(torch.equal(x.param, y.param) for x, y in zip(a, b))

        tp.perturb(ours, terms, **kw)
        TORCH_PASSES.perturb(ref, terms, **kw)
        if not same(ours, ref):
            return f"the Triton perturbation pass disagrees with PyTorch {what}"
        for x, y in zip(ours, ref):
            if not torch.equal(tp.copy(x, terms, **kw), TORCH_PASSES.copy(y, terms, **kw)):
                return f"the Triton perturbed copy disagrees with PyTorch {what}"
        upd = dict(restore=[(12, 2e-3)], update=[(13, -1e-4)], decay=1e-3, round_seed=5, **kw)
        tp.update_group(ours, **upd)
        TORCH_PASSES.update_group(ref, **upd)
        if not same(ours, ref):
            return f"the Triton update pass disagrees with PyTorch {what}"
        st_t = [{"momentum_buffer": torch.zeros(s.param.shape, device=device)} for s in ours]
        st_r = [{"momentum_buffer": torch.zeros(s.param.shape, device=device)} for s in ref]
        rule_kw = dict(rule="momentum", restore=[], grads=[(14, 0.5)], lr=1e-3, weight_decay=0.0, **kw)
        tp.rule_group(ours, states=st_t, steps=[1] * len(ours), **rule_kw)
        TORCH_PASSES.rule_group(ref, states=st_r, steps=[1] * len(ref), **rule_kw)
        bufs = all(torch.equal(a["momentum_buffer"], b["momentum_buffer"]) for a, b in zip(st_t, st_r))
        if not (same(ours, ref) and bufs):
            return f"the Triton momentum pass disagrees with PyTorch {what}"
    return None


# --------------------------------------------------------------------------- choosing
def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend that runs the passes for tensors on ``device``: ``"triton"`` or ``"torch"``.

    * ``"auto"``: Triton on CUDA devices when it imports and passes the first-use check there
      (``triton_self_check``), PyTorch otherwise;
    * ``"triton"``: Triton; raises ``ImportError`` with the ``pip install`` line if missing,
      and ``ValueError`` for a non-CUDA device (unless ``TRITON_INTERPRET=1``, for tests);
    * ``"torch"``: the PyTorch passes of ``zo_plugins.core.passes``.
    """
    return _resolve(name, device)[0]


def _resolve(name: str, device: torch.device | str) -> tuple[str, str]:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is invalid: use one of {BACKENDS}.")
    device = torch.device(device)
    if name == "torch":
        return "torch", "backend='torch' was asked for"
    if name == "triton":
        require_triton()
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"backend='triton' runs on CUDA devices; the parameters are on {device}. Use "
                "backend='auto' or 'torch' (or set TRITON_INTERPRET=1 to run the kernels on CPU, "
                "slowly, for tests)."
            )
        return "triton", "backend='triton' was asked for"
    if device.type != "cuda":
        return "torch", f"the parameters are on {device.type} and the Triton kernels run on CUDA"
    if not triton_available():
        return "torch", f"triton does not import ({_triton_import_error()}); {TRITON_INSTALL_HINT}"
    reason = triton_self_check(device)
    if reason is not None:
        return "torch", reason
    return "triton", f"the Triton kernels passed the first-use check on {device}"


_LOGGED: set[str] = set()


def select_backend(requested: str, specs: Sequence[ParamSpec]) -> tuple[str, Passes, str]:
    """(name, passes, reason) for an optimizer's tensors.  Triton needs one device and no
    float64 tensor; under ``"auto"`` a fallback's reason is logged once per reason."""
    devices = {s.param.device for s in specs}
    name, reason = _resolve(requested, next(iter(devices)))
    if name == "triton":
        fp64 = [s.name for s in specs if s.param.dtype == torch.float64]
        if fp64 and requested == "triton":
            raise ValueError(
                f"backend='triton' has no float64 kernels ({fp64[0]!r} is float64): use backend='torch'."
            )
        if fp64:
            name, reason = "torch", f"the Triton kernels have no float64 variant ({fp64[0]!r} is float64)"
        elif len(devices) > 1:
            name, reason = "torch", f"the parameters span several devices ({sorted(map(str, devices))})"
    if requested == "auto" and name == "torch" and any(d.type == "cuda" for d in devices):
        if reason not in _LOGGED:
            _LOGGED.add(reason)
            logger.warning("zo_plugins: using the PyTorch passes, not the Triton kernels: %s.", reason)
    return name, (_triton_passes() if name == "triton" else TORCH_PASSES), reason


def _kernel_thresholds(specs: Sequence[ParamSpec]) -> list[float | None]:
    return [None if s.mask is None else s.mask.kernel_threshold for s in specs]


def _thresholded(p: Passes) -> Passes:
    """The Triton passes with each spec's magnitude mask passed as ``magnitude_threshold``."""

    def many(fn):
        return lambda specs, *a, **kw: fn(specs, *a, magnitude_threshold=_kernel_thresholds(specs), **kw)

    def one(fn):
        return lambda spec, *a, **kw: fn(spec, *a, magnitude_threshold=_kernel_thresholds([spec])[0], **kw)

    return Passes(many(p.perturb), one(p.copy), one(p.update), many(p.update_group), many(p.rule_group))


def passes_for_masks(name: str, passes: Passes, specs: Sequence[ParamSpec]) -> Passes:
    """The passes that honour this step's masks: Sparse MeZO's magnitude mask runs in the
    Triton kernels (a threshold tested in registers); random and user masks (callables) run
    on the PyTorch passes, which draw the same streams."""
    if name == "torch":
        return passes
    masks = [s.mask for s in specs if s.mask is not None]
    if not masks:
        return passes
    from .sparsity import MagnitudeMask

    if all(isinstance(m, MagnitudeMask) for m in masks):
        return _thresholded(passes)
    return TORCH_PASSES
