"""Trajectory logs: a ZO run stored as (projected gradient, lr, weight decay) per step, and
the pieces ``replay`` needs to rebuild the fine-tuned weights from the starting weights.

Format (specified in docs/trajectory.md): one JSON header line, then binary records.

* Header (UTF-8 JSON, ending in ``\n``): ``format``, ``version``, ``library_version``,
  ``torch_version``, ``backend``, ``base_hash`` (SHA-256 of the trainable tensors' names,
  dtypes, shapes and bytes before the first step), ``config`` (the ``ZOConfig``), ``groups``
  (parameter names of each param group).
* Record: ``u16 length`` of the body, the body, then 8 bytes of
  ``SHA-256(previous chain + body)`` (the genesis chain is 8 zero bytes), so an edited,
  reordered or removed record fails verification.  Body, little-endian:
  ``u32 step``, ``u8 flags`` (1 skipped, 2 clipped, 4 lr/wd follow, 8 shifts follow),
  ``u8 n`` then ``n`` float64 projected gradients, then if flag 4 ``u8 g`` and ``g`` pairs of
  float64 (lr, weight decay) — written only when they changed since the previous record —
  then if flag 8 ``u16 m`` and ``m`` bytes of JSON: the in-place perturbation passes of the
  step as ``[[[query, coeff], ...], ...]`` — written only when they differ from a plain
  step's ``+eps``/``-eps`` pair per query.
* A plain step with a constant learning rate costs 2 + 14 + 8 = 24 bytes: a 20,000-step run
  is 480 KB whatever the model's size.

Each record is written with one ``write`` and flushed, so a crash loses at most the step in
flight; a truncated last record is detected on read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["TrajectoryError", "TrajectoryWriter", "read_trajectory", "weights_hash", "FORMAT", "VERSION"]

FORMAT = "zo-trajectory"
VERSION = 1
_GENESIS = bytes(8)
SKIPPED, CLIPPED, HAS_LR, HAS_SHIFTS = 1, 2, 4, 8


class TrajectoryError(ValueError):
    """A trajectory log that cannot be used: truncated, tampered with, or not matching."""


def weights_hash(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of tensors in the given order: name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _chain(prev: bytes, body: bytes) -> bytes:
    return hashlib.sha256(prev + body).digest()[:8]


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def plain_shifts(eps: float, n_queries: int) -> list[list[list[float]]]:
    """The in-place passes of a step with one micro-batch and finite losses."""
    out: list[list[list[float]]] = []
    for q in range(n_queries):
        out += [[[q, eps]], [[q, -eps]]]
    return out


def encode_record(rec: dict[str, Any], prev: dict[str, Any] | None, eps: float, n_queries: int) -> bytes:
    flags = (SKIPPED if rec["skipped"] else 0) | (CLIPPED if rec["clipped"] else 0)
    grads = rec["grads"]
    lrwd = list(zip(rec["lr"], rec["wd"]))
    if prev is None or list(zip(prev["lr"], prev["wd"])) != lrwd:
        flags |= HAS_LR
    shifts = rec["shifts"]
    if shifts != plain_shifts(eps, n_queries):
        flags |= HAS_SHIFTS
    body = struct.pack("<IBB", rec["step"], flags, len(grads)) + struct.pack(f"<{len(grads)}d", *grads)
    if flags & HAS_LR:
        body += struct.pack("<B", len(lrwd)) + b"".join(struct.pack("<dd", lr, wd) for lr, wd in lrwd)
    if flags & HAS_SHIFTS:
        blob = json.dumps(shifts, separators=(",", ":")).encode()
        body += struct.pack("<H", len(blob)) + blob
    return body


def decode_record(body: bytes, prev: dict[str, Any] | None, eps: float, n_queries: int) -> dict[str, Any]:
    step, flags, n = struct.unpack_from("<IBB", body, 0)
    pos = 6
    grads = list(struct.unpack_from(f"<{n}d", body, pos))
    pos += 8 * n
    if flags & HAS_LR:
        (g,) = struct.unpack_from("<B", body, pos)
        pos += 1
        pairs = [struct.unpack_from("<dd", body, pos + 16 * i) for i in range(g)]
        pos += 16 * g
        lr, wd = [p[0] for p in pairs], [p[1] for p in pairs]
    elif prev is None:
        raise ValueError("the first record carries no learning rate")
    else:
        lr, wd = prev["lr"], prev["wd"]
    if flags & HAS_SHIFTS:
        (m,) = struct.unpack_from("<H", body, pos)
        shifts = json.loads(body[pos + 2 : pos + 2 + m])
        pos += 2 + m
    else:
        shifts = plain_shifts(eps, n_queries)
    if pos != len(body):
        raise ValueError(f"{len(body) - pos} stray bytes")
    return {
        "step": step,
        "grads": grads,
        "lr": lr,
        "wd": wd,
        "shifts": shifts,
        "skipped": bool(flags & SKIPPED),
        "clipped": bool(flags & CLIPPED),
    }


class TrajectoryWriter:
    """Append-only writer.  Opening an existing log for step ``start_step`` > 0 (a resumed
    run) keeps its header and the records of steps before ``start_step`` and drops the rest
    (steps a crashed run made after its last checkpoint), atomically."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any], start_step: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            records: list[dict[str, Any]] = []
            head = header
        else:
            if not self.path.exists():
                raise TrajectoryError(
                    f"Resuming at step {start_step} but the trajectory log {self.path} does not "
                    "exist: point trajectory_path at the log the run started, or start from step 0."
                )
            head, records = read_trajectory(self.path, allow_truncated_tail=True)
            for key in ("config", "groups"):
                if head[key] != header[key]:
                    raise TrajectoryError(
                        f"The trajectory log {self.path} was written with another {key} "
                        f"({head[key]!r}) than this run's ({header[key]!r})."
                    )
            records = [r for r in records if r["step"] < start_step]
            if len(records) != start_step:
                raise TrajectoryError(
                    f"The trajectory log {self.path} holds {len(records)} steps before step "
                    f"{start_step}; it cannot continue this run."
                )
        self.eps, self.n_queries = head["config"]["eps"], head["config"]["n_queries"]
        self.last_chain, self.prev = _GENESIS, None
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(head, sort_keys=True).encode() + b"\n")
            for r in records:
                f.write(self._encode(r))
            _fsync(f)
        os.replace(tmp, self.path)
        self._f = open(self.path, "ab")  # noqa: SIM115

    def _encode(self, rec: dict[str, Any]) -> bytes:
        body = encode_record(rec, self.prev, self.eps, self.n_queries)
        self.last_chain = _chain(self.last_chain, body)
        self.prev = rec
        return struct.pack("<H", len(body)) + body + self.last_chain

    def append(self, record: dict[str, Any]) -> None:
        self._f.write(self._encode(record))
        self._f.flush()  # a crash loses at most the step in flight

    def sync(self) -> None:
        """Force the records written so far to disk (called when a checkpoint is saved)."""
        if not self._f.closed:
            _fsync(self._f)

    def close(self) -> None:
        if not self._f.closed:
            _fsync(self._f)
            self._f.close()


def read_trajectory(
    path: str | os.PathLike, *, allow_truncated_tail: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read and verify a log: header, then records with consecutive steps from 0 and an
    intact hash chain.  Raises ``TrajectoryError`` naming the first bad record."""
    path = Path(path)
    if not path.exists():
        raise TrajectoryError(f"No trajectory log at {path}.")
    data = path.read_bytes()
    nl = data.find(b"\n")
    if nl < 0:
        raise TrajectoryError(f"{path} has no header line: it is not a trajectory log (or is truncated).")
    try:
        header = json.loads(data[:nl])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrajectoryError(f"{path}: the header is not valid JSON ({e}).") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TrajectoryError(f"{path} is not a zo-trajectory log.")
    if header.get("version") != VERSION:
        raise TrajectoryError(
            f"{path} is format version {header.get('version')}; this library reads {VERSION}."
        )
    eps, nq = header["config"]["eps"], header["config"]["n_queries"]
    pos, chain, records, prev = nl + 1, _GENESIS, [], None
    while pos < len(data):
        i = len(records)
        if pos + 2 > len(data) or pos + 2 + struct.unpack_from("<H", data, pos)[0] + 8 > len(data):
            if allow_truncated_tail:
                break  # the step in flight when the process died
            raise TrajectoryError(f"{path}: record {i} is incomplete (the log was truncated).")
        (length,) = struct.unpack_from("<H", data, pos)
        body = data[pos + 2 : pos + 2 + length]
        tag = data[pos + 2 + length : pos + 10 + length]
        chain = _chain(chain, body)
        if tag != chain:
            raise TrajectoryError(
                f"{path}: record {i} fails its hash chain: the log was edited, reordered or had records removed."
            )
        try:
            rec = decode_record(body, prev, eps, nq)
        except (struct.error, ValueError) as e:
            raise TrajectoryError(f"{path}: record {i} is malformed ({e}).") from e
        if rec["step"] != i:
            raise TrajectoryError(f"{path}: record {i} is step {rec['step']}, expected {i}.")
        records.append(rec)
        prev = rec
        pos += 10 + length
    return header, records
