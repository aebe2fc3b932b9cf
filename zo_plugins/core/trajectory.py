"""Trajectory logs: a ZO run stored as (projected gradient, lr, weight decay) per step, and
the pieces ``replay`` needs to rebuild the fine-tuned weights from the starting weights.

Format version 2 (specified in docs/trajectory.md; version 1 is still read):

* Header: one UTF-8 JSON line ending in ``\\n`` -- ``format``, ``version`` (of this format, 2),
  ``stream_version`` (of the direction streams, ``core.noise.STREAM_VERSION``),
  ``library_version`` and ``torch_version`` (information only), ``backend``, ``base_hash``
  (SHA-256 of the trainable tensors' names, dtypes, shapes and bytes before the first step),
  ``config`` (the ``ZOConfig``), ``groups`` (parameter names of each param group) -- then an
  8-byte tag ``SHA-256(header line with its \\n)[:8]``, which is also the genesis of the chain.
* Record: ``u32 length`` of the body, the body, then 8 bytes of
  ``SHA-256(previous chain + body)``, so an edited header, an edited, reordered or removed
  record fails verification.  Body, little-endian: ``u32 step``, ``u8 flags`` (1 skipped,
  2 clipped, 4 lr/wd follow, 8 passes follow, 16 end record), ``u32 n`` then ``n`` float64
  projected gradients (n = the per-step count the config implies, or 0 for a skipped step),
  then if flag 4 ``u32 g`` and ``g`` pairs of float64 (lr, weight decay), g = the number of
  param groups, written only when they changed since the previous record; then if flag 8
  ``u32 m`` and ``m`` bytes of JSON: the step's in-place perturbation passes as
  ``[[[query, coeff], ...], ...]``, written only when they differ from a plain step's
  ``+eps``/``-eps`` pair per query.
* End record (flags == 16 exactly, nothing may follow it): ``u32 steps`` (the number of
  records before it), ``u8 flags``, the 32-byte SHA-256 of the final trainable weights
  (``weights_hash``).  A log without one was cut (or its writer closed without ``finish``).
* A plain step with a constant learning rate costs 4 + 17 + 8 = 29 bytes; the end record 49.

Version 1: no ``stream_version``, no header tag (the genesis chain is 8 zero bytes), ``u16``
record length, ``u8 n``, ``u8 g``, ``u16 m``, no end record.

Each record is written with one ``write`` and flushed, so a crash loses at most the step in
flight; a truncated last record is detected on read.  The header and every record are checked
against each other before anything is allocated from them: a header whose counts are absurd
(above ``MAX_COUNT``) or disagree with the records is refused with ``TrajectoryError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ZOConfig
from .noise import STREAM_VERSION
from .registry import ESTIMATORS

__all__ = [
    "TrajectoryError",
    "TrajectoryLog",
    "TrajectoryWriter",
    "read_log",
    "read_trajectory",
    "weights_hash",
    "FORMAT",
    "VERSION",
    "READABLE_VERSIONS",
    "MAX_COUNT",
]

FORMAT = "zo-trajectory"
VERSION = 2
"""The format version this library writes."""
READABLE_VERSIONS = (1, 2)
MAX_COUNT = 1 << 20
"""Largest n_queries / cge_coordinates a log may declare (each is 8 bytes per step and, in
place, two recorded passes per query); larger values are refused before anything is read."""
SKIPPED, CLIPPED, HAS_LR, HAS_SHIFTS, END = 1, 2, 4, 8, 16
_V1_FLAGS = SKIPPED | CLIPPED | HAS_LR | HAS_SHIFTS
_HASH_RE = re.compile(r"[0-9a-f]{64}")
# struct codes of the record length, n, g and m per format version
_WIDTHS = {1: ("H", "B", "B", "H"), 2: ("I", "I", "I", "I")}
_END_BODY = 4 + 1 + 32


class TrajectoryError(ValueError):
    """A trajectory log that cannot be used: truncated, tampered with, or not matching."""


class _Bad(Exception):
    """Internal: what is wrong, without the path (the public functions prefix it)."""


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


def _header_line(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True).encode() + b"\n"


def _header_tag(line: bytes) -> bytes:
    """The v2 header tag and genesis chain: SHA-256 of the header line (with its newline)."""
    return hashlib.sha256(line).digest()[:8]


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def plain_shifts(eps: float, n_queries: int) -> list[list[list[float]]]:
    """The in-place passes of a step with one micro-batch and finite losses."""
    out: list[list[list[float]]] = []
    for q in range(n_queries):
        out += [[[q, eps]], [[q, -eps]]]
    return out


# ---------------------------------------------------------------------------- header
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class _Spec:
    """What the records of a log must agree with, taken from its validated header."""

    version: int
    eps: float
    n_queries: int
    count: int  # projected gradients per non-skipped step
    n_groups: int
    in_place: bool = True
    _plain: list[list[list[float]]] | None = None

    @property
    def plain(self) -> list[list[list[float]]]:
        # built once per log and shared by its plain records (n_queries may be large)
        if self._plain is None:
            self._plain = plain_shifts(self.eps, self.n_queries) if self.in_place else []
        return self._plain


def _check_header(h: Any) -> _Spec:
    """Validate a parsed header completely; raise ``_Bad`` naming the first problem."""
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise _Bad("is not a zo-trajectory log (its header has no format 'zo-trajectory').")
    v = h.get("version")
    if not _is_int(v):
        raise _Bad(f"the header's version is {v!r}, not an integer format version.")
    if v not in READABLE_VERSIONS:
        raise _Bad(
            f"is format version {v}; this zo_plugins reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade zo_plugins to read it."
        )
    required = ["library_version", "torch_version", "backend", "base_hash", "config", "groups"]
    if v >= 2:
        required.append("stream_version")
    missing = [k for k in required if k not in h]
    if missing:
        raise _Bad(f"the header has no {missing[0]!r} (a version-{v} header carries {', '.join(required)}).")
    for key in ("library_version", "torch_version", "backend"):
        if not isinstance(h[key], str) or not h[key]:
            raise _Bad(f"the header's {key} is {h[key]!r}, not a non-empty string.")
    if not isinstance(h["base_hash"], str) or not _HASH_RE.fullmatch(h["base_hash"]):
        raise _Bad(f"the header's base_hash is {h['base_hash']!r}, not a SHA-256 hex digest.")
    if v >= 2 and (not _is_int(h["stream_version"]) or h["stream_version"] < 1):
        raise _Bad(f"the header's stream_version is {h['stream_version']!r}, not an integer >= 1.")
    groups = h["groups"]
    if not isinstance(groups, list) or not all(
        isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups
    ):
        raise _Bad("the header's groups are not a list of lists of parameter names.")
    if not groups:
        raise _Bad("the header lists no param group.")
    names = [n for g in groups for n in g]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise _Bad(f"the header's groups name parameter {dup!r} twice.")
    cfg = h["config"]
    if not isinstance(cfg, dict):
        raise _Bad(f"the header's config is a {type(cfg).__name__}, not an object.")
    for key in ("eps", "n_queries", "estimator", "cge_coordinates"):
        if key not in cfg:
            raise _Bad(f"the header's config has no {key!r}.")
    for key in ("n_queries", "cge_coordinates"):
        if not _is_int(cfg[key]) or not 1 <= cfg[key] <= MAX_COUNT:
            raise _Bad(
                f"the header's config.{key} is {cfg[key]!r}: a log holds an integer in [1, {MAX_COUNT}]."
            )
    unknown = sorted(set(cfg) - set(ZOConfig.field_names()))
    if unknown:
        raise _Bad(f"the header's config has an unknown field {unknown[0]!r}.")
    try:
        config = ZOConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise _Bad(f"the header's config is invalid: {e}") from None
    count = ESTIMATORS[config.estimator].grads_per_step(config)  # e.g. hizoo: 2 per direction
    in_place = h.get("in_place")
    if in_place is not None and not (
        isinstance(in_place, list) and all(isinstance(n, str) for n in in_place)
    ):
        raise _Bad(f"the header's in_place is {in_place!r}, not a list of parameter names.")
    # a run that perturbs nothing in place makes no in-place passes: its plain step records none
    perturbs_in_place = in_place is None or bool(in_place)
    return _Spec(v, float(cfg["eps"]), cfg["n_queries"], count, len(groups), perturbs_in_place)


# ---------------------------------------------------------------------------- records
def _check_shifts(shifts: Any, n_queries: int) -> None:
    ok = isinstance(shifts, (list, tuple)) and all(
        isinstance(terms, (list, tuple))
        and all(
            isinstance(t, (list, tuple))
            and len(t) == 2
            and _is_int(t[0])
            and 0 <= t[0] < n_queries
            and _is_number(t[1])
            for t in terms
        )
        for terms in shifts
    )
    if not ok:
        raise _Bad(
            f"its passes are not a list of [[query, coeff], ...] with query in [0, {n_queries}) "
            "and finite coefficients."
        )


def _check_record(rec: dict[str, Any], spec: _Spec) -> None:
    """The rules every record obeys (the writer enforces what the reader will check)."""
    n = len(rec["grads"])
    if n != spec.count and not (rec["skipped"] and n == 0):
        raise _Bad(
            f"holds {n} projected gradients; the header's config implies {spec.count} per step"
            + (" (or 0 for a skipped step)." if rec["skipped"] else ".")
        )
    if len(rec["lr"]) != spec.n_groups or len(rec["wd"]) != spec.n_groups:
        raise _Bad(
            f"holds {len(rec['lr'])} learning rates and {len(rec['wd'])} weight decays for the "
            f"header's {spec.n_groups} param groups."
        )


def encode_record(rec: dict[str, Any], prev: dict[str, Any] | None, spec: _Spec) -> bytes:
    """The version-2 body of ``rec`` (``prev``: the record before it, or None)."""
    flags = (SKIPPED if rec["skipped"] else 0) | (CLIPPED if rec["clipped"] else 0)
    grads = rec["grads"]
    lrwd = list(zip(rec["lr"], rec["wd"]))
    if prev is None or list(zip(prev["lr"], prev["wd"])) != lrwd:
        flags |= HAS_LR
    shifts = rec["shifts"]
    if shifts != spec.plain:
        flags |= HAS_SHIFTS
    body = struct.pack("<IBI", rec["step"], flags, len(grads)) + struct.pack(f"<{len(grads)}d", *grads)
    if flags & HAS_LR:
        body += struct.pack("<I", len(lrwd)) + b"".join(struct.pack("<dd", lr, wd) for lr, wd in lrwd)
    if flags & HAS_SHIFTS:
        blob = json.dumps(shifts, separators=(",", ":")).encode()
        body += struct.pack("<I", len(blob)) + blob
    return body


class _Cursor:
    def __init__(self, body: bytes) -> None:
        self.body, self.pos = body, 0

    def take(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.body):
            raise _Bad(f"its body ends {self.pos + size - len(self.body)} bytes early.")
        out = struct.unpack_from("<" + fmt, self.body, self.pos)
        self.pos += size
        return out


def decode_record(body: bytes, prev: dict[str, Any] | None, spec: _Spec) -> dict[str, Any]:
    """Decode and check one record body of format ``spec.version``."""
    _, n_code, g_code, m_code = _WIDTHS[spec.version]
    cur = _Cursor(body)
    step, flags = cur.take("IB")
    if flags & ~_V1_FLAGS:
        raise _Bad(f"it has unknown flags {flags:#04x}.")
    skipped = bool(flags & SKIPPED)
    (n,) = cur.take(n_code)
    if n != spec.count and not (skipped and n == 0):  # checked before n is allocated
        raise _Bad(f"holds {n} projected gradients; the header's config implies {spec.count} per step.")
    grads = list(cur.take(f"{n}d"))
    if flags & HAS_LR:
        (g,) = cur.take(g_code)
        if g != spec.n_groups:
            raise _Bad(f"holds learning rates for {g} param groups; the header has {spec.n_groups}.")
        pairs = cur.take(f"{2 * g}d")
        lr, wd = list(pairs[0::2]), list(pairs[1::2])
    elif prev is None:
        raise _Bad("it is the first record and carries no learning rate.")
    else:
        lr, wd = prev["lr"], prev["wd"]
    if flags & HAS_SHIFTS:
        (m,) = cur.take(m_code)
        if cur.pos + m > len(body):
            raise _Bad(f"its passes run {cur.pos + m - len(body)} bytes past its body.")
        try:
            shifts = json.loads(body[cur.pos : cur.pos + m])
        except (ValueError, RecursionError) as e:
            raise _Bad(f"its passes are not valid JSON ({type(e).__name__}).") from None
        _check_shifts(shifts, spec.n_queries)
        cur.pos += m
    else:
        shifts = spec.plain
    if cur.pos != len(body):
        raise _Bad(f"it has {len(body) - cur.pos} stray bytes.")
    return {
        "step": step,
        "grads": grads,
        "lr": lr,
        "wd": wd,
        "shifts": shifts,
        "skipped": skipped,
        "clipped": bool(flags & CLIPPED),
    }


# ---------------------------------------------------------------------------- reading
@dataclass
class TrajectoryLog:
    """A verified log: its header, its records (steps 0, 1, ...) and its end record
    ``{"steps": int, "final_hash": str}`` (None when the log was cut or never finished).
    Records whose passes are the plain ones share one ``shifts`` list: treat records as
    read-only."""

    header: dict[str, Any]
    records: list[dict[str, Any]]
    end: dict[str, Any] | None
    path: Path

    @property
    def complete(self) -> bool:
        """True iff an end record closes the log."""
        return self.end is not None


def read_log(path: str | os.PathLike, *, allow_truncated_tail: bool = False) -> TrajectoryLog:
    """Read and verify a log of format version 1 or 2: the header (fully validated, and in
    version 2 checked against its tag), then records with consecutive steps from 0, an intact
    hash chain and counts agreeing with the header, then optionally the end record.

    A log whose last record is cut raises unless ``allow_truncated_tail`` (then the intact
    records are returned, ``end`` None).  A log that simply stops after a record (or right
    after its header) reads fine with ``complete == False``: callers decide whether that is an
    error.  Anything else raises ``TrajectoryError`` naming the header or the first bad record.
    """
    path = Path(path)
    if not path.exists():
        raise TrajectoryError(f"No trajectory log at {path}.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TrajectoryError(f"Cannot read the trajectory log {path}: {e}") from e
    nl = data.find(b"\n")
    if nl < 0:
        raise TrajectoryError(f"{path} has no header line: it is not a trajectory log (or is truncated).")
    try:
        header = json.loads(data[:nl])
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise TrajectoryError(f"{path}: the header is not valid JSON ({e}): the log is damaged.") from None
    if isinstance(header, dict) and header.get("format") == FORMAT and header.get("version") == 2:
        tag = data[nl + 1 : nl + 9]
        if len(tag) < 8:
            raise TrajectoryError(f"{path}: the header's tag is incomplete (the log was truncated).")
        if tag != _header_tag(data[: nl + 1]):
            raise TrajectoryError(f"{path}: the header fails its hash tag: the log was edited or damaged.")
        pos, chain = nl + 9, tag
    else:
        pos, chain = nl + 1, bytes(8)
    try:
        spec = _check_header(header)
    except _Bad as e:
        raise TrajectoryError(f"{path} {e}" if str(e).startswith("is ") else f"{path}: {e}") from None

    length_code = "<" + _WIDTHS[spec.version][0]
    length_size = struct.calcsize(length_code)
    records: list[dict[str, Any]] = []
    end: dict[str, Any] | None = None
    prev = None
    while pos < len(data):
        i = len(records)
        if end is not None:
            raise TrajectoryError(
                f"{path}: {len(data) - pos} bytes follow the end record: the log is malformed."
            )
        if pos + length_size > len(data) or (
            pos + length_size + struct.unpack_from(length_code, data, pos)[0] + 8 > len(data)
        ):
            if allow_truncated_tail:
                break  # the step in flight when the process died
            raise TrajectoryError(f"{path}: record {i} is incomplete (the log was truncated).")
        (length,) = struct.unpack_from(length_code, data, pos)
        body = data[pos + length_size : pos + length_size + length]
        tag = data[pos + length_size + length : pos + length_size + length + 8]
        chain = _chain(chain, body)
        if tag != chain:
            raise TrajectoryError(
                f"{path}: record {i} fails its hash chain: the log was edited, reordered or had records removed."
            )
        pos += length_size + length + 8
        try:
            if spec.version >= 2 and len(body) >= 5 and body[4] & END:
                if body[4] != END or len(body) != _END_BODY:
                    raise _Bad("it is a malformed end record.")
                (steps,) = struct.unpack_from("<I", body, 0)
                if steps != i:
                    raise _Bad(f"it is an end record claiming {steps} steps after {i} records.")
                end = {"steps": steps, "final_hash": body[5:].hex()}
                continue
            rec = decode_record(body, prev, spec)
        except _Bad as e:
            raise TrajectoryError(f"{path}: record {i} is malformed: {e}") from None
        if rec["step"] != i:
            raise TrajectoryError(f"{path}: record {i} is step {rec['step']}, expected {i}.")
        records.append(rec)
        prev = rec
    return TrajectoryLog(header, records, end, path)


def read_trajectory(
    path: str | os.PathLike, *, allow_truncated_tail: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``read_log`` as (header, records): raises ``TrajectoryError`` naming the first bad
    record; says nothing about a missing end record (use ``read_log(...).complete``)."""
    log = read_log(path, allow_truncated_tail=allow_truncated_tail)
    return log.header, log.records


# ---------------------------------------------------------------------------- writing
class TrajectoryWriter:
    """Append-only writer of format version 2.  The header it writes is ``header`` with
    ``format``, ``version`` and ``stream_version`` set (a conflicting value raises); it is
    validated like a read header, so a run whose log could not be read is refused here,
    before the first step.  Opening an existing log for step ``start_step`` > 0 (a resumed
    run) keeps its header and the records of steps before ``start_step``, drops the rest
    (steps a crashed run made after its last checkpoint) and any end record, atomically."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any], start_step: int) -> None:
        self.path = Path(path)
        if not _is_int(start_step) or start_step < 0:
            raise ValueError(f"Invalid start_step: {start_step!r} (use an integer >= 0).")
        try:  # what is checked and compared is what a reader will get back
            head = json.loads(json.dumps(header))
        except (TypeError, ValueError) as e:
            raise TrajectoryError(
                f"Cannot log this run to {self.path}: the header is not JSON ({e})."
            ) from None
        if not isinstance(head, dict):
            raise TrajectoryError(f"Cannot log this run to {self.path}: the header is not a dict.")
        for key, value in (("format", FORMAT), ("version", VERSION), ("stream_version", STREAM_VERSION)):
            if head.setdefault(key, value) != value:
                raise ValueError(
                    f"The trajectory header says {key}={head[key]!r}; this writer writes {key}={value!r}."
                )
        try:
            spec = _check_header(head)
        except _Bad as e:
            raise TrajectoryError(f"Cannot log this run to {self.path}: {e}") from None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records: list[dict[str, Any]] = []
        if start_step > 0:
            if not self.path.exists():
                raise TrajectoryError(
                    f"Resuming at step {start_step} but the trajectory log {self.path} does not "
                    "exist: point trajectory_path at the log the run started, or start from step 0."
                )
            log = read_log(self.path, allow_truncated_tail=True)
            if log.header["version"] != VERSION:
                raise TrajectoryError(
                    f"The trajectory log {self.path} is format version {log.header['version']}, which "
                    "does not record its direction-stream version, so it cannot be continued: resume "
                    f"with zo_plugins {log.header['library_version']} (which wrote it) or log to a new path."
                )
            for key in ("config", "groups", "backend", "stream_version"):
                if log.header[key] != head[key]:
                    raise TrajectoryError(
                        f"The trajectory log {self.path} was written with another {key} "
                        f"({log.header[key]!r}) than this run's ({head[key]!r})."
                    )
            records = [r for r in log.records if r["step"] < start_step]
            if len(records) != start_step:
                raise TrajectoryError(
                    f"The trajectory log {self.path} holds {len(records)} steps before step "
                    f"{start_step}; it cannot continue this run."
                )
            head, spec = log.header, _check_header(log.header)
        self._spec = spec
        self.steps = 0  # records written so far
        self.end: dict[str, Any] | None = None
        line = _header_line(head)
        self._chain, self._prev = _header_tag(line), None
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(line + self._chain)
            for r in records:
                f.write(self._encode(r))
            _fsync(f)
        os.replace(tmp, self.path)
        self._f = open(self.path, "ab")  # noqa: SIM115

    def _frame(self, body: bytes) -> bytes:
        self._chain = _chain(self._chain, body)
        return struct.pack("<I", len(body)) + body + self._chain

    def _encode(self, rec: dict[str, Any]) -> bytes:
        """Check ``rec`` against the header and encode it; nothing changes if it raises."""
        where = f"Cannot log step {self.steps} to {self.path}"
        missing = [k for k in ("step", "grads", "lr", "wd", "shifts", "skipped", "clipped") if k not in rec]
        if missing:
            raise TrajectoryError(f"{where}: the record has no {missing[0]!r}.")
        if rec["step"] != self.steps:
            raise TrajectoryError(
                f"{where}: the record is step {rec['step']!r}; steps are consecutive from 0."
            )
        try:
            _check_record(rec, self._spec)
            if rec["shifts"] != self._spec.plain:
                _check_shifts(rec["shifts"], self._spec.n_queries)
            body = encode_record(rec, self._prev, self._spec)
        except _Bad as e:
            raise TrajectoryError(f"{where}: the record {e}") from None
        except (struct.error, TypeError, ValueError) as e:
            raise TrajectoryError(f"{where}: the record cannot be encoded ({e}).") from None
        framed = self._frame(body)
        self._prev = rec
        self.steps += 1
        return framed

    def _check_open(self) -> None:
        if self._f.closed:
            state = "finished" if self.end is not None else "closed"
            raise TrajectoryError(f"The trajectory log {self.path} is {state}: nothing more can be written.")

    def append(self, record: dict[str, Any]) -> None:
        """Write one step's record (keys ``step, grads, lr, wd, shifts, skipped, clipped``)."""
        self._check_open()
        self._f.write(self._encode(record))
        self._f.flush()  # a crash loses at most the step in flight

    def finish(self, final_hash: str) -> None:
        """Write the end record (``steps`` = records written so far, ``final_hash`` the
        ``weights_hash`` of the final trainable weights) and close the log."""
        self._check_open()
        if not isinstance(final_hash, str) or not _HASH_RE.fullmatch(final_hash):
            raise ValueError(f"Invalid final_hash: {final_hash!r} (use weights_hash(...), 64 hex digits).")
        body = struct.pack("<IB", self.steps, END) + bytes.fromhex(final_hash)
        self._f.write(self._frame(body))
        self.end = {"steps": self.steps, "final_hash": final_hash}
        self.close()

    def sync(self) -> None:
        """Force the records written so far to disk (called when a checkpoint is saved)."""
        if not self._f.closed:
            _fsync(self._f)

    def close(self) -> None:
        """Sync and close; without ``finish`` the log has no end record (it reads as cut)."""
        if not self._f.closed:
            _fsync(self._f)
            self._f.close()
