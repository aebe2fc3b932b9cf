"""Offloading the transformer blocks: ``ZOConfig(offload="cpu" | "disk", offload_dir=...)``.

The blocks (the model's ``nn.ModuleList`` of decoder layers, found by ``find_blocks``) live
in CPU memory or in memory-mapped safetensors files on disk; embeddings, the final norm and
the head stay where the model is.  A block is brought in when its forward starts and let go
when it ends:

* ``"cpu"`` on a CUDA model: the block's tensors are kept in pinned CPU memory and copied to
  the device on arrival (the next block's copy is issued on a side stream while this one
  computes), the trained ones copied back on departure.  On a CPU model the blocks are
  already in CPU memory: only the update-on-arrival schedule below applies.
* ``"disk"``: one safetensors file per block under ``offload_dir``, opened read-write and
  memory-mapped (``MAP_SHARED``); the parameters *are* views of the mapping.  On arrival the
  kernel is asked to read the next block ahead (``MADV_WILLNEED``); on departure the block's
  pages are dropped from the process (``MADV_DONTNEED``: what was written stays in the page
  cache and reaches the file), so the resident memory stays at a couple of blocks whatever
  the model's size.  The files remain valid safetensors files.

With the one-visit schedule (``core.dual``) both perturbed forwards of a step run on a block
during one visit, and the previous step's update of the block is applied **on arrival**, from
the recorded step (seeds, learning rate, weight decay): there is no separate update pass over
the offloaded weights.  ``flush()`` applies what is pending (before a checkpoint is written,
and when training ends); a forward -- evaluation included -- always sees up-to-date blocks.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .passes import ParamSpec, internal_reads
from .watch import sum_of_squares

__all__ = ["find_blocks", "BlockOffload", "OFFLOAD_MODES", "materialize_on_disk"]

logger = logging.getLogger("zo_plugins")

OFFLOAD_MODES = ("cpu", "disk")
_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _release_freed_memory() -> None:
    """Hand the heap the blocks' in-memory copies occupied back to the OS (glibc keeps freed
    allocations below its mmap threshold -- up to 32 MiB, most block tensors -- in the heap, so
    the resident set would not shrink after offloading)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """(qualified name, blocks) of the model's transformer blocks: the ``nn.ModuleList`` of at
    least two modules of one class holding the most parameters (Llama/Mistral/Qwen/Phi
    ``model.layers``, OPT ``model.decoder.layers``, GPT-2 ``transformer.h``, under PEFT too).
    Raises ``ValueError`` naming the model when there is none."""
    best: tuple[int, str, list[nn.Module]] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2:
            continue
        kids = list(m)
        if len({type(k) for k in kids}) != 1:
            continue
        size = sum(p.numel() for k in kids for p in k.parameters())
        if size and (best is None or size > best[0]):
            best = (size, name, kids)
    if best is None:
        raise ValueError(
            f"Offloading and the one-visit schedule need the model's transformer blocks in an nn.ModuleList "
            f"(Llama, Mistral, Qwen, Phi, OPT, GPT-2 have one); {type(model).__name__} has none. Use "
            "ZOConfig(offload=None, schedule='per-forward')."
        )
    return best[1], best[2]


# ----------------------------------------------------------------------------- safetensors files
def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file of ``tensors`` written in bounded chunks (no full copy in memory)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            step = 1 << 26
            for i in range(0, flat.numel(), step):
                f.write(flat[i : i + step].cpu().numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _MappedFile:
    """A safetensors file mapped read-write; ``views`` are tensors into the mapping."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.mm = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        (hlen,) = struct.unpack_from("<Q", self.mm, 0)
        self.header = json.loads(bytes(self.mm[8 : 8 + hlen]))
        self.data_start = 8 + hlen
        inv = {v: k for k, v in _ST_DTYPES.items()}
        self.views: dict[str, torch.Tensor] = {}
        for name, meta in self.header.items():
            if name == "__metadata__":
                continue
            lo, hi = meta["data_offsets"]
            dtype = inv[meta["dtype"]]
            count = (hi - lo) // torch.empty((), dtype=dtype).element_size()
            t = torch.frombuffer(self.mm, dtype=dtype, count=count, offset=self.data_start + lo)
            self.views[name] = t.view(meta["shape"])

    def touch(self) -> None:
        """Read one byte of every page (in a background thread: numpy's loop releases the GIL),
        so the pages are resident when the block's forward reads them."""
        import numpy as np

        view = np.frombuffer(self.mm, dtype=np.uint8)
        int(view[:: mmap.PAGESIZE].sum(dtype=np.uint64))

    def advise(self, what: int) -> None:
        try:
            self.mm.madvise(what, 0, self.size)
        except (AttributeError, OSError, ValueError):  # pragma: no cover - no madvise here
            pass

    def flush(self) -> None:
        self.mm.flush()

    def close(self) -> None:
        self.views.clear()
        try:
            self.mm.close()
        except BufferError:  # tensors still view the mapping: the OS unmaps at exit
            pass
        os.close(self.fd)


# ----------------------------------------------------------------------------- the offload
class BlockOffload:
    """The blocks of one model, offloaded (see the module docstring).

    ``pending`` holds, per block, the updates recorded by the optimizer and not yet applied:
    ``(spec, apply)`` pairs, ``apply(spec)`` running the update pass on the block's tensors
    as they are when the block arrives."""

    def __init__(
        self,
        model: nn.Module,
        mode: str,
        offload_dir: str | os.PathLike | None,
        *,
        files: Sequence[_MappedFile] | None = None,
    ) -> None:
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"offload={mode!r} is invalid: use one of {OFFLOAD_MODES}, or None.")
        self.model = model
        self.mode = mode
        self.block_name, self.blocks = find_blocks(model)
        self.block_of: dict[int, int] = {}
        for i, b in enumerate(self.blocks):
            for p in b.parameters():
                self.block_of[id(p)] = i
        self.pending: dict[int, list[tuple[ParamSpec, Callable[[ParamSpec], None]]]] = {}
        self.visits = 0
        self.bytes_in = 0
        self.sumsq: dict[int, float] | None = {}
        """Per block, the float64 sum of squares of its trainable tensors, taken on the block's
        first visit (the optimizer's first-step weight norm: reading them outside a visit would
        read every block file once more and leave its pages resident); None once not needed."""
        self._files: list[_MappedFile] = []
        self._handles: list[Any] = []
        self._lock = threading.Lock()
        device = next(iter(self.blocks[0].parameters())).device
        self.device = device
        self._stream = None
        self._masters: list[dict[str, torch.Tensor]] = []
        self._staged: dict[int, tuple[Any, list[torch.Tensor]]] = {}  # CUDA: blocks copied ahead
        self._inflight: list[tuple[Any, list[torch.Tensor]]] = []  # CUDA: copies back not yet landed
        self._prefetching: dict[int, threading.Thread] = {}  # disk: pages being read ahead
        if mode == "disk":
            if offload_dir is None:
                raise ValueError(
                    "offload='disk' needs ZOConfig(offload_dir=...): a folder for the block files."
                )
            self.dir = Path(offload_dir)
            self.dir.mkdir(parents=True, exist_ok=True)
            self._to_disk(files)
        elif device.type == "cuda":
            self._to_host()
        else:
            logger.info(
                "zo_plugins: offload='cpu' on a CPU model: the blocks are in CPU memory already; only the "
                "update-on-arrival schedule applies."
            )
        for i, b in enumerate(self.blocks):
            self._handles.append(
                b.register_forward_pre_hook(lambda m, a, i=i: self._internal(self.arrive, i))
            )
            self._handles.append(
                b.register_forward_hook(lambda m, a, o, i=i: self._internal(self.depart, i), always_call=True)
            )

    @staticmethod
    def _internal(fn: Callable[[int], None], i: int) -> None:
        # the hooks run inside the model's forward: the update, norm and copies they make of the
        # block's tensors are not the model reading them outside their modules (core.perturbation)
        with internal_reads():
            fn(i)

    # ------------------------------------------------------------------ placement
    def _named(self, i: int) -> list[tuple[nn.Module, str, torch.Tensor]]:
        out = []
        for m in self.blocks[i].modules():
            for attr, p in m._parameters.items():
                if p is not None:
                    out.append((m, attr, p))
        return out

    def _to_disk(self, files: Sequence[_MappedFile] | None) -> None:
        """Each block's tensors into its file (from the model's current weights), the
        parameters rebound to views of the mapping; ``files`` already hold them
        (``materialize_on_disk``)."""
        if files is not None:
            self._files = list(files)
            return
        for i in range(len(self.blocks)):
            path = self.dir / f"block-{i:05d}.safetensors"
            named = self._named(i)
            _write_safetensors(path, {str(j): p.detach() for j, (_, _, p) in enumerate(named)})
            f = _MappedFile(path)
            with torch.no_grad():
                for j, (_, _, p) in enumerate(named):
                    p.data = f.views[str(j)]
            f.advise(mmap.MADV_DONTNEED)
            self._files.append(f)
        _release_freed_memory()

    def _to_host(self) -> None:
        """CUDA model, offload='cpu': pinned CPU masters; the parameters point at them."""
        self._stream = torch.cuda.Stream(self.device)
        with torch.no_grad():
            for i in range(len(self.blocks)):
                masters = {}
                for j, (_, _, p) in enumerate(self._named(i)):
                    host = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
                    host.copy_(p.detach())
                    masters[str(j)] = host
                    p.data = host
                self._masters.append(masters)
        torch.cuda.empty_cache()

    # ------------------------------------------------------------------ visits
    def arrive(self, i: int) -> None:
        """Bring block ``i`` in, start bringing the next one, then apply ``i``'s pending updates."""
        self.visits += 1
        nxt = i + 1 if i + 1 < len(self.blocks) else None
        if self.mode == "disk":
            t = self._prefetching.pop(i, None)
            if t is not None:
                t.join()
            self.bytes_in += self._files[i].size
            if nxt is not None and nxt not in self._prefetching:
                th = threading.Thread(target=self._files[nxt].touch, daemon=True, name=f"zo-prefetch-{nxt}")
                th.start()
                self._prefetching[nxt] = th
        elif self._masters:
            self._h2d_arrive(i)
            if nxt is not None:
                self._h2d_issue(nxt)  # overlaps block i's compute on the side stream
        self._apply_pending(i)
        if self.sumsq is not None and i not in self.sumsq:
            with torch.no_grad():
                self.sumsq[i] = sum(
                    sum_of_squares(p, 1 << 20) for _, _, p in self._named(i) if p.requires_grad
                )

    def depart(self, i: int) -> None:
        """Let block ``i`` go: drop its pages (disk) or copy its trained tensors back to the
        pinned host masters (on the side stream, after the compute that wrote them)."""
        if self.mode == "disk":
            self._files[i].advise(mmap.MADV_DONTNEED)
        elif self._masters:
            compute = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(compute)
            with torch.no_grad(), torch.cuda.stream(self._stream):
                resident = []
                for j, (_, _, p) in enumerate(self._named(i)):
                    host = self._masters[i][str(j)]
                    if p.requires_grad:
                        host.copy_(p.detach(), non_blocking=True)
                    resident.append(p.data)
                    p.data = host
            self._inflight.append((torch.cuda.Event(), resident))
            self._inflight[-1][0].record(self._stream)

    # ------------------------------------------------------------------ CUDA transfers (offload="cpu")
    def _h2d_issue(self, i: int) -> None:
        if i in self._staged:
            return
        with torch.no_grad(), torch.cuda.stream(self._stream):
            staged = [
                self._masters[i][str(j)].to(self.device, non_blocking=True)
                for j in range(len(self._masters[i]))
            ]
            ev = torch.cuda.Event()
            ev.record(self._stream)
        self._staged[i] = (ev, staged)

    def _h2d_arrive(self, i: int) -> None:
        while self._inflight and self._inflight[0][0].query():  # copies back that have landed
            self._inflight.pop(0)
        self._h2d_issue(i)
        ev, staged = self._staged.pop(i)
        torch.cuda.current_stream(self.device).wait_event(ev)
        with torch.no_grad():
            for (_, _, p), t in zip(self._named(i), staged):
                p.data = t
        self.bytes_in += sum(t.numel() * t.element_size() for t in staged)

    def _apply_pending(self, i: int) -> None:
        todo = self.pending.pop(i, None)
        if todo:
            with torch.no_grad():
                for spec, apply in todo:
                    apply(spec)

    # ------------------------------------------------------------------ updates
    def owns(self, spec: ParamSpec) -> bool:
        return id(spec.param) in self.block_of

    def defer(self, spec: ParamSpec, apply: Callable[[ParamSpec], None]) -> None:
        """Record ``apply`` for ``spec``'s block, to run when the block next arrives.  A block
        holds at most one step's updates: a second one applies the first now."""
        i = self.block_of[id(spec.param)]
        queued = self.pending.setdefault(i, [])
        if any(s is spec for s, _ in queued):  # two steps without a forward in between
            self.flush(blocks=[i])
            queued = self.pending.setdefault(i, [])
        queued.append((spec, apply))

    def flush(self, blocks: Sequence[int] | None = None) -> None:
        """Apply every pending update now (a pass over each block that has one) and make the
        storage hold it (the files synced; CUDA copies back landed)."""
        for i in sorted(self.pending if blocks is None else blocks):
            if i in self.pending:
                self.arrive(i)
                self.depart(i)
        for t in self._prefetching.values():
            t.join()
        self._prefetching.clear()
        if self.mode == "disk":
            for f in self._files:
                f.flush()
        elif self._masters:
            torch.cuda.synchronize(self.device)
            self._inflight.clear()
            self._staged.clear()

    def close(self) -> None:
        self.flush()
        for h in self._handles:
            h.remove()
        self._handles.clear()


def materialize_on_disk(
    model: nn.Module,
    offload_dir: str | os.PathLike,
    init: Callable[[str, torch.Tensor], None],
    *,
    device: torch.device | str = "cpu",
) -> BlockOffload:
    """Build a model too large for memory.  ``model`` has its parameters on the meta device
    (e.g. built under ``accelerate.init_empty_weights()``, which keeps the buffers real); its
    blocks are written straight to one safetensors file each under ``offload_dir`` --
    ``init(name, tensor)`` fills one tensor at a time, so memory holds one tensor -- and the
    parameters become views of the files; the rest is materialised on ``device``.  Returns
    the ``BlockOffload`` (pass it as ``ZOOptimizer(..., offload=...)``'s storage through
    ``ZOConfig(offload="disk", offload_dir=the same folder)``)."""
    _, blocks = find_blocks(model)
    inside = {id(p) for b in blocks for p in b.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    d = Path(offload_dir)
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for i, b in enumerate(blocks):
        named = [(m, attr, p) for m in b.modules() for attr, p in m._parameters.items() if p is not None]
        path = d / f"block-{i:05d}.safetensors"
        tensors = {}
        for j, (_, _, p) in enumerate(named):
            t = torch.empty(p.shape, dtype=p.dtype)
            init(names[id(p)], t)
            tensors[str(j)] = t
        _write_safetensors(path, tensors)
        del tensors
        f = _MappedFile(path)
        for j, (m, attr, p) in enumerate(named):
            m._parameters[attr] = nn.Parameter(f.views[str(j)], requires_grad=p.requires_grad)
        f.advise(mmap.MADV_DONTNEED)
        files.append(f)
    for m in model.modules():
        for attr, p in list(m._parameters.items()):
            if p is not None and id(p) not in inside and p.device.type == "meta":
                t = torch.empty(p.shape, dtype=p.dtype, device=device)
                init(names.get(id(p), attr), t)
                m._parameters[attr] = nn.Parameter(t, requires_grad=p.requires_grad)
    offload = BlockOffload(model, "disk", offload_dir, files=files)
    model._zo_offload = offload  # type: ignore[attr-defined]  # ZOOptimizer(offload="disk") takes it over
    return offload
