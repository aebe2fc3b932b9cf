"""Trajectory logs: replay is bit-identical, tampering and truncation are detected, the log
is a few dozen bytes per step; the format-2 layout, its checks and format-1 compatibility."""

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from zo_testing import assert_bit_identical, params_snapshot

from zo_plugins import TrajectoryError, ZOConfig, ZOOptimizer, read_trajectory, replay
from zo_plugins.core.noise import STREAM_VERSION
from zo_plugins.core.trajectory import FORMAT, MAX_COUNT, VERSION, TrajectoryWriter, read_log, weights_hash


def make(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(30, 8, padding_idx=0), nn.Dropout(0.1), nn.Linear(8, 1)).to(dtype)


def train(model, log, steps=12, nan_at=(), **kw):
    ids = torch.randint(0, 30, (16, 5), generator=torch.Generator().manual_seed(1))
    opt = ZOOptimizer(model, lr=1e-2, weight_decay=0.1, trajectory_path=log, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    for i in range(steps):
        scale = float("nan") if i in nan_at else 1.0
        opt.step(lambda: model(ids).float().pow(2).mean() * scale)
        sched.step()
    opt.close()
    return opt


@pytest.mark.parametrize(
    "dtype,kw",
    [
        (torch.float32, {}),  # in place: replay repeats the perturbation passes' rounding
        (torch.float32, {"perturbation": "out-of-place", "n_queries": 2}),
        (torch.bfloat16, {"distribution": "rademacher"}),  # out of place + stochastic rounding
    ],
)
def test_replay_is_bit_identical(tmp_path, dtype, kw):
    log = tmp_path / "run.zot"
    trained = make(dtype)
    opt = train(trained, log, nan_at=(5,), **kw)
    assert opt.skipped_steps == 1
    base = make(dtype)
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), trained.parameters()))
    replay(base, log)
    assert_bit_identical(params_snapshot(trained), params_snapshot(base))


def test_replay_of_a_prefix_and_log_size(tmp_path):
    log = tmp_path / "run.zot"
    trained = make()
    train(trained, log, steps=40, perturbation="in-place")  # plain steps: no passes stored
    header, records = read_trajectory(log)
    assert len(records) == 40 and header["config"]["eps"] == 1e-3
    header_bytes = len(log.read_bytes().split(b"\n", 1)[0]) + 1 + 8  # the line and its tag
    end_bytes = 4 + 37 + 8 if read_log(log).complete else 0
    per_step = (os.path.getsize(log) - header_bytes - end_bytes) / 40
    # 29 bytes for a plain step, 49 when lr/wd changed (here every 4th step; one param group)
    assert per_step == (30 * 29 + 10 * 49) / 40, per_step
    part = make()
    replay(part, log, steps=10)
    ref = make()
    train(ref, tmp_path / "ten.zot", steps=10, perturbation="in-place")
    assert_bit_identical(params_snapshot(ref), params_snapshot(part))


def test_replay_refuses_other_base_weights_version_and_names(tmp_path, monkeypatch):
    log = tmp_path / "run.zot"
    train(make(), log)
    other = make()
    with torch.no_grad():
        other[2].bias.add_(1e-6)
    before = params_snapshot(other)
    with pytest.raises(TrajectoryError, match="starting weights"):
        replay(other, log)
    assert_bit_identical(before, params_snapshot(other))
    with pytest.raises(TrajectoryError, match="no parameter"):
        replay(nn.Sequential(nn.Linear(8, 1)), log)
    # format 2 versions the direction streams, not the library: another library version
    # replays, other streams need allow_version_mismatch
    import zo_plugins

    monkeypatch.setattr(zo_plugins, "__version__", "9.9.9")
    replay(make(), log)
    header, records = read_trajectory(log)
    other_streams = tmp_path / "streams.zot"
    other_streams.write_bytes(spec_log({**header, "stream_version": STREAM_VERSION + 1}, records))
    with pytest.raises(TrajectoryError, match="allow_version_mismatch"):
        replay(make(), other_streams)
    replay(make(), other_streams, allow_version_mismatch=True)


@pytest.mark.parametrize("damage", ["truncate", "flip", "drop", "header", "header-bit"])
def test_tampered_or_truncated_logs_are_refused(tmp_path, damage):
    log = tmp_path / "run.zot"
    train(make(), log)
    data = bytearray(log.read_bytes())
    head_end = data.index(b"\n") + 1 + 8  # the header line and its tag
    rec = 4 + struct.unpack_from("<I", data, head_end)[0] + 8  # u32 length, body, chain
    if damage == "truncate":
        data = data[:-5]
        match = "incomplete"
    elif damage == "flip":
        data[head_end + 4 + 9 + 2] ^= 0x01  # one bit of the first projected gradient
        match = "hash chain"
    elif damage == "header-bit":
        data[data.index(b'"base_hash": "') + 20] ^= 0x01  # still valid JSON and a valid hash
        match = "header fails its hash tag"
    elif damage == "drop":
        data = data[:head_end] + data[head_end + rec :]
        match = "hash chain"
    else:
        data = b'{"format": "something-else"}\n' + data[head_end:]
        match = "not a zo-trajectory"
    log.write_bytes(bytes(data))
    model = make()
    before = params_snapshot(model)
    with pytest.raises(TrajectoryError, match=match):
        replay(model, log)
    assert_bit_identical(before, params_snapshot(model))


def test_resumed_run_continues_the_log(tmp_path):
    log = tmp_path / "run.zot"
    ids = torch.randint(1, 30, (16, 5), generator=torch.Generator().manual_seed(1))
    full = make()
    opt = ZOOptimizer(full, lr=1e-2, trajectory_path=tmp_path / "full.zot")
    for _ in range(8):
        opt.step(lambda: full(ids).pow(2).mean())
    opt.close()

    a = make()
    opt = ZOOptimizer(a, lr=1e-2, trajectory_path=log)
    for i in range(6):
        opt.step(lambda: a(ids).pow(2).mean())
        if i == 3:  # a checkpoint: weights, optimizer and the RNG (dropout) state
            saved = (params_snapshot(a), opt.state_dict(), torch.get_rng_state())
    opt.close()  # "crashed" after step 5; the checkpoint is from step 3
    b = make()
    b.load_state_dict(saved[0])
    opt = ZOOptimizer(b, lr=1e-2, trajectory_path=log)
    opt.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    for _ in range(4):
        opt.step(lambda: b(ids).pow(2).mean())
    opt.close()
    assert_bit_identical(params_snapshot(full), params_snapshot(b))
    _, records = read_trajectory(log)
    assert [r["step"] for r in records] == list(range(8))
    base = make()
    replay(base, log)
    assert_bit_identical(params_snapshot(full), params_snapshot(base))


# ---------------------------------------------------------------------------- format v2
# The tests below exercise the log format directly (TrajectoryWriter / read_log on synthetic
# headers and records), with an encoder written here from docs/trajectory.md, independent of
# the module's, so the documented byte layout itself is under test.

SPEC_WIDTHS = {1: ("H", "B", "B", "H"), 2: ("I", "I", "I", "I")}  # record length, n, g, m
END_FLAG = 16


def spec_config(**kw):
    cfg = ZOConfig(**kw).to_dict()
    cfg.pop("trajectory_path")
    return json.loads(json.dumps(cfg))


def spec_header(n_groups=1, version=2, **cfg_kw):
    header = {
        "format": "zo-trajectory",
        "version": version,
        "library_version": "0.0.test",
        "torch_version": torch.__version__,
        "backend": "torch",
        "base_hash": weights_hash([]),
        "config": spec_config(**cfg_kw),
        "groups": [[f"g{i}.weight", f"g{i}.bias"] for i in range(n_groups)],
    }
    if version >= 2:
        header["stream_version"] = STREAM_VERSION
    return header


def spec_plain(header):
    eps, nq = header["config"]["eps"], header["config"]["n_queries"]
    return [[[q, s * eps]] for q in range(nq) for s in (1, -1)]


def spec_is_plain(shifts, header):
    # the length first: headers in these tests may claim 10**9 queries
    return len(shifts) == 2 * header["config"]["n_queries"] and shifts == spec_plain(header)


def spec_record(header, step, grads=None, lr=1e-2, wd=0.0, shifts=None, skipped=False, clipped=False):
    cfg, n_groups = header["config"], len(header["groups"])
    count = cfg["cge_coordinates"] if cfg["estimator"] == "cge" else cfg["n_queries"]
    if grads is None:
        grads = [] if skipped else [0.25 * (step + 1) + q / 7 for q in range(count)]
    return {
        "step": step,
        "grads": grads,
        "lr": [lr] * n_groups if isinstance(lr, float) else lr,
        "wd": [wd] * n_groups if isinstance(wd, float) else wd,
        "shifts": spec_plain(header) if shifts is None else shifts,
        "skipped": skipped,
        "clipped": clipped,
    }


def spec_log(header, records, version=None, end_hash=None):
    """The bytes of a log as docs/trajectory.md specifies them.  An item of ``records`` that is
    ``bytes`` is framed as a raw body (to build malformed logs with a valid hash chain)."""
    version = header["version"] if version is None else version
    length, n_code, g_code, m_code = SPEC_WIDTHS[version]
    line = json.dumps(header, sort_keys=True).encode() + b"\n"
    chain = hashlib.sha256(line).digest()[:8] if version == 2 else bytes(8)
    out = line + (chain if version == 2 else b"")

    def frame(body):
        nonlocal chain
        chain = hashlib.sha256(chain + body).digest()[:8]
        return struct.pack("<" + length, len(body)) + body + chain

    prev = None
    for r in records:
        if isinstance(r, bytes):
            out += frame(r)
            continue
        lrwd = list(zip(r["lr"], r["wd"]))
        flags = (1 if r["skipped"] else 0) | (2 if r["clipped"] else 0)
        flags |= 4 if prev is None or list(zip(prev["lr"], prev["wd"])) != lrwd else 0
        flags |= 0 if spec_is_plain(r["shifts"], header) else 8
        body = struct.pack(f"<IB{n_code}", r["step"], flags, len(r["grads"]))
        body += b"".join(struct.pack("<d", g) for g in r["grads"])
        if flags & 4:
            body += struct.pack("<" + g_code, len(lrwd)) + b"".join(struct.pack("<dd", *p) for p in lrwd)
        if flags & 8:
            blob = json.dumps(r["shifts"], separators=(",", ":")).encode()
            body += struct.pack("<" + m_code, len(blob)) + blob
        out += frame(body)
        prev = r
    if end_hash is not None:
        out += frame(struct.pack("<IB", len(records), END_FLAG) + bytes.fromhex(end_hash))
    return out


def v1_header(header):
    """A version-1 header as zo_plugins wrote them before format 2: no stream_version."""
    return {**{k: v for k, v in header.items() if k != "stream_version"}, "version": 1}


def sample_records(header):
    """Four kinds of record: plain, lr change, explicit passes (accumulation), skipped."""
    eps = header["config"]["eps"]
    return [
        spec_record(header, 0),
        spec_record(header, 1),
        spec_record(header, 2, lr=5e-3, clipped=True),
        spec_record(header, 3, shifts=[[[0, eps]], [[0, -eps]], [[0, eps]], [[0, -eps]], []]),
        spec_record(header, 4, skipped=True, shifts=[[[0, eps]], []]),
        spec_record(header, 5),
    ]


FINAL = hashlib.sha256(b"final weights").hexdigest()


def write_sample(path, header=None, finish=True):
    """A log written by TrajectoryWriter; returns (header, records, file size after the header
    and after each record)."""
    header = header or spec_header()
    records = sample_records(header)
    w = TrajectoryWriter(path, header, 0)
    sizes = [os.path.getsize(path)]
    for r in records:
        w.append(r)
        sizes.append(os.path.getsize(path))
    if finish:
        w.finish(FINAL)
    else:
        w.close()
    return header, records, sizes


def test_writer_bytes_follow_the_documented_v2_layout(tmp_path):
    header, records, sizes = write_sample(tmp_path / "a.zot")
    data = (tmp_path / "a.zot").read_bytes()
    assert data == spec_log(header, records, end_hash=FINAL)
    line = len(json.dumps(header, sort_keys=True)) + 1
    # header line + 8-byte tag; a plain record 4 + 17 + 8 = 29 bytes, +4+16 per group with lr/wd
    assert sizes[0] == line + 8
    assert [b - a for a, b in zip(sizes, sizes[1:])][:3] == [49, 29, 49]
    assert len(data) - sizes[-1] == 4 + 37 + 8  # the end record
    log = read_log(tmp_path / "a.zot")
    assert log.header == header and log.records == records and log.path == tmp_path / "a.zot"
    assert log.end == {"steps": 6, "final_hash": FINAL} and log.complete
    assert read_trajectory(tmp_path / "a.zot") == (header, records)


def test_writer_sets_the_format_and_stream_versions(tmp_path):
    header = spec_header()
    bare = {k: v for k, v in header.items() if k not in ("format", "version", "stream_version")}
    TrajectoryWriter(tmp_path / "a.zot", bare, 0).close()
    got = read_log(tmp_path / "a.zot").header
    assert (got["format"], got["version"], got["stream_version"]) == (FORMAT, VERSION, STREAM_VERSION)
    assert VERSION == 2
    with pytest.raises(TrajectoryError, match="header is not JSON"):
        TrajectoryWriter(tmp_path / "b.zot", {**header, "note": {1, 2}}, 0)
    for key, value in (("version", 1), ("stream_version", STREAM_VERSION + 1), ("format", "x")):
        with pytest.raises(ValueError, match=key):
            TrajectoryWriter(tmp_path / "b.zot", {**header, key: value}, 0)


def test_v1_logs_still_read(tmp_path):
    header = spec_header()
    records = sample_records(header)
    (tmp_path / "v1.zot").write_bytes(spec_log(v1_header(header), records))
    log = read_log(tmp_path / "v1.zot")
    assert log.header == v1_header(header) and "stream_version" not in log.header
    assert log.records == records
    assert log.end is None and not log.complete
    # v1 has no end record: flag 16 there is an unknown flag
    bad = spec_log(v1_header(header), records[:1] + [struct.pack("<IBB", 1, END_FLAG, 0)])
    (tmp_path / "bad.zot").write_bytes(bad)
    with pytest.raises(TrajectoryError, match="record 1 is malformed: it has unknown flags 0x10"):
        read_log(tmp_path / "bad.zot")


def test_v1_log_of_a_real_run_replays(tmp_path):
    """A log of ZOOptimizer re-encoded the way format 1 stores it reads to the same records and
    still replays to the trained weights."""
    trained = make()
    train(trained, tmp_path / "v2.zot")
    header, records = read_trajectory(tmp_path / "v2.zot")
    assert header["version"] == 2 and header["stream_version"] == STREAM_VERSION
    (tmp_path / "v1.zot").write_bytes(spec_log(v1_header(header), records))
    assert read_trajectory(tmp_path / "v1.zot") == (v1_header(header), records)
    base = make()
    # a v1 header does not say which streams drew its directions (replay assumes version 1;
    # this one was drawn with today's), hence allow_version_mismatch
    replay(base, tmp_path / "v1.zot", allow_version_mismatch=True)
    assert_bit_identical(params_snapshot(trained), params_snapshot(base))


@pytest.mark.parametrize("version", [1, 2])
def test_every_header_byte_flip_is_a_trajectory_error(tmp_path, version):
    header = spec_header(version=version)
    data = spec_log(header, sample_records(header), end_hash=FINAL if version == 2 else None)
    head_end = data.index(b"\n") + 1 + (8 if version == 2 else 0)  # v2: the tag too
    log, undetected = tmp_path / "flip.zot", 0
    for i in range(head_end):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[i] ^= 1 << bit
            log.write_bytes(bytes(damaged))
            try:
                read_log(log)  # any exception other than TrajectoryError fails the test
            except TrajectoryError:
                continue
            undetected += 1
    if version == 2:
        assert undetected == 0  # the tag chains the header
    else:
        # v1 cannot detect every flip (e.g. inside base_hash), but never fails another way
        assert 0 < undetected < head_end * 8 / 4, undetected


def test_truncation_at_every_offset(tmp_path):
    src = tmp_path / "full.zot"
    header, records, sizes = write_sample(src)
    data = src.read_bytes()
    cut = tmp_path / "cut.zot"
    for k in range(len(data) + 1):
        cut.write_bytes(data[:k])
        whole = [j for j, s in enumerate(sizes) if s <= k]  # whole[-1] records fit
        if k in sizes or k == len(data):
            log = read_log(cut)
            assert log.records == records[: whole[-1]]
            assert log.complete == (k == len(data))
            assert log.end == ({"steps": 6, "final_hash": FINAL} if k == len(data) else None)
        else:
            with pytest.raises(TrajectoryError, match="incomplete|no header line|truncated"):
                read_log(cut)
        if k < sizes[0]:  # inside the header or its tag: never a usable log
            with pytest.raises(TrajectoryError):
                read_log(cut, allow_truncated_tail=True)
        else:
            log = read_log(cut, allow_truncated_tail=True)
            assert log.records == records[: whole[-1]], k
            assert log.complete == (k == len(data))


def test_log_cut_right_after_the_header(tmp_path):
    header = spec_header()
    TrajectoryWriter(tmp_path / "a.zot", header, 0).close()
    log = read_log(tmp_path / "a.zot")
    assert log.records == [] and log.end is None and log.complete is False
    assert log.header == header
    assert read_trajectory(tmp_path / "a.zot") == (header, [])
    assert os.path.getsize(tmp_path / "a.zot") == len(json.dumps(header, sort_keys=True)) + 1 + 8


def test_end_record_round_trips_and_closes_the_log(tmp_path):
    header = spec_header()
    w = TrajectoryWriter(tmp_path / "empty.zot", header, 0)
    w.finish(FINAL)
    log = read_log(tmp_path / "empty.zot")
    assert log.records == [] and log.end == {"steps": 0, "final_hash": FINAL} and log.complete
    header, records, _ = write_sample(tmp_path / "a.zot")
    assert read_log(tmp_path / "a.zot").end == {"steps": len(records), "final_hash": FINAL}

    w = TrajectoryWriter(tmp_path / "b.zot", header, 0)
    w.append(records[0])
    before = (tmp_path / "b.zot").read_bytes()
    for bad in ("ab" * 32 + "0", FINAL.upper(), None):
        with pytest.raises(ValueError, match="final_hash"):
            w.finish(bad)
    assert (tmp_path / "b.zot").read_bytes() == before
    w.finish(FINAL)
    with pytest.raises(TrajectoryError, match="finished"):
        w.append(records[1])
    with pytest.raises(TrajectoryError, match="finished"):
        w.finish(FINAL)
    w.close()  # a no-op once finished
    assert read_log(tmp_path / "b.zot").end == {"steps": 1, "final_hash": FINAL}


@pytest.mark.parametrize(
    "tail,match",
    [
        ("record", "follow the end record"),  # a valid record after the end record
        ("garbage", "follow the end record"),
        ("wrong-steps", "end record claiming 5 steps after 6 records"),
        ("end-flags", "malformed end record"),  # flag 16 with another flag
        ("end-short", "malformed end record"),
    ],
)
def test_malformed_end_records_are_refused(tmp_path, tail, match):
    header = spec_header()
    records = sample_records(header)
    end_body = struct.pack("<IB", len(records), END_FLAG) + bytes.fromhex(FINAL)
    if tail == "record":
        data = spec_log(header, [*records, end_body, spec_record(header, 6)])
    elif tail == "garbage":
        data = spec_log(header, records, end_hash=FINAL) + b"\x00"
    elif tail == "wrong-steps":
        data = spec_log(header, [*records, struct.pack("<IB", 5, END_FLAG) + bytes.fromhex(FINAL)])
    elif tail == "end-flags":
        data = spec_log(header, [*records, struct.pack("<IB", 6, END_FLAG | 1) + bytes.fromhex(FINAL)])
    else:
        data = spec_log(header, [*records, end_body[:-1]])
    (tmp_path / "a.zot").write_bytes(data)
    for allow in (False, True):
        with pytest.raises(TrajectoryError, match=match):
            read_log(tmp_path / "a.zot", allow_truncated_tail=allow)


def test_counts_above_255_round_trip(tmp_path):
    """n_queries, cge_coordinates, param groups and recorded passes beyond v1's u8/u16 fields."""
    gen = torch.Generator().manual_seed(0)
    header = spec_header(n_groups=300, n_queries=1000)
    eps = header["config"]["eps"]
    grads = torch.randn(1000, generator=gen, dtype=torch.float64).tolist()
    lrs = torch.rand(300, generator=gen, dtype=torch.float64).tolist()
    shifts = [[[q, eps * (1 + q / 3)]] for q in range(1000) for _ in range(4)]
    assert len(json.dumps(shifts, separators=(",", ":"))) > 65535  # past v1's u16 m
    records = [
        spec_record(header, 0, grads=grads, lr=lrs, wd=lrs[::-1]),
        spec_record(header, 1, shifts=shifts),
    ]
    w = TrajectoryWriter(tmp_path / "a.zot", header, 0)
    for r in records:
        w.append(r)
    w.finish(FINAL)
    log = read_log(tmp_path / "a.zot")
    assert log.records == records and log.complete
    assert log.records[0]["grads"] == grads and log.records[0]["lr"] == lrs  # float64 exact

    header = spec_header(estimator="cge", cge_coordinates=4096)
    record = spec_record(header, 0)
    assert len(record["grads"]) == 4096
    TrajectoryWriter(tmp_path / "cge.zot", header, 0).append(record)
    assert read_log(tmp_path / "cge.zot").records == [record]


def test_more_than_255_queries_train_log_and_replay(tmp_path):
    trained = make()
    train(trained, tmp_path / "run.zot", steps=2, n_queries=300, perturbation="out-of-place")
    header, records = read_trajectory(tmp_path / "run.zot")
    assert [len(r["grads"]) for r in records] == [300, 300]
    base = make()
    replay(base, tmp_path / "run.zot")
    assert_bit_identical(params_snapshot(trained), params_snapshot(base))


# Each case is read in a child process whose heap is capped (RLIMIT_DATA, 512 MiB above what it
# holds after importing zo_plugins), so an implementation that sizes anything by the header's
# count fails with MemoryError here instead of exhausting the machine.
_ALLOCATION_PROBE = r"""
import json, re, resource, sys, time, tracemalloc
from zo_plugins.core.trajectory import read_log
status = open("/proc/self/status").read()
heap = int(re.search(r"VmData:\s+(\d+) kB", status).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (heap + (512 << 20), resource.getrlimit(resource.RLIMIT_DATA)[1]))
out = []
for path in sys.argv[1:]:
    tracemalloc.start()
    t = time.perf_counter()
    try:
        read_log(path)
        err = (None, "")
    except BaseException as e:
        err = (type(e).__name__, str(e))
    out.append([*err, time.perf_counter() - t, tracemalloc.get_traced_memory()[1]])
    tracemalloc.stop()
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for the heap cap")
def test_absurd_header_counts_are_refused_before_allocating(tmp_path):
    good = spec_header()

    def plain_step(version):
        # one gradient, lr/wd, no passes (flag 8 unset): a reader that builds the header's
        # default passes for it (2 per query) allocates 2 * n_queries lists
        n, g = SPEC_WIDTHS[version][1:3]
        return struct.pack(f"<IB{n}d{g}dd", 0, 4, 1, 0.5, 1, 1e-2, 0.0)

    cases = {}  # file -> what the error must name
    for name, version, cfg, recs, match in [
        ("v2", 2, {"n_queries": 10**9}, [plain_step(2)], "config.n_queries is 1000000000"),
        ("v1", 1, {"n_queries": 10**9}, [plain_step(1)], "config.n_queries is 1000000000"),
        ("bare", 2, {"n_queries": 10**9}, [], "config.n_queries is 1000000000"),
        ("cge", 2, {"estimator": "cge", "cge_coordinates": 2**21}, [], "config.cge_coordinates is 2097152"),
        # the largest count allowed, but the record holds 1: refused at record 0, nothing built
        ("max", 2, {"n_queries": MAX_COUNT}, [plain_step(2)], "record 0 is malformed: holds 1 projected"),
    ]:
        header = {**good, "config": {**good["config"], **cfg}}
        if version == 1:
            header = v1_header(header)
        path = tmp_path / f"{name}.zot"
        path.write_bytes(spec_log(header, recs))
        cases[str(path)] = match
    proc = subprocess.run(
        [sys.executable, "-c", _ALLOCATION_PROBE, *cases],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for (path, match), (kind, msg, seconds, peak) in zip(cases.items(), json.loads(proc.stdout)):
        assert kind == "TrajectoryError" and match in msg, (path, kind, msg)
        assert seconds < 1.0 and peak < 1 << 20, (path, seconds, peak)
    # the writer refuses such a run before writing anything
    with pytest.raises(TrajectoryError, match=f"n_queries is {MAX_COUNT + 1}"):
        TrajectoryWriter(
            tmp_path / "new.zot", {**good, "config": {**good["config"], "n_queries": MAX_COUNT + 1}}, 0
        )
    assert not (tmp_path / "new.zot").exists()


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


def _cfg(header, **kw):
    return {**header, "config": {**header["config"], **kw}}


MALFORMED_HEADERS = [
    (lambda h: [h], "not a zo-trajectory log"),
    (lambda h: _without(h, "format"), "not a zo-trajectory log"),
    (lambda h: {**h, "version": "2"}, "version is '2', not an integer"),
    (lambda h: {**h, "version": True}, "version is True, not an integer"),
    (lambda h: {**h, "version": 3}, "format version 3; this zo_plugins reads versions 1, 2"),
    (lambda h: _without(h, "stream_version"), "no 'stream_version'"),
    (lambda h: {**h, "stream_version": "2"}, "stream_version is '2'"),
    (lambda h: {**h, "stream_version": 0}, "stream_version is 0"),
    (lambda h: _without(h, "base_hash"), "no 'base_hash'"),
    (lambda h: {**h, "base_hash": "xyz"}, "base_hash is 'xyz'"),
    (lambda h: {**h, "library_version": 1}, "library_version is 1"),
    (lambda h: {**h, "backend": None}, "backend is None"),
    (lambda h: _without(h, "groups"), "no 'groups'"),
    (lambda h: {**h, "groups": "g0.weight"}, "groups are not a list of lists"),
    (lambda h: {**h, "groups": [["a", 1]]}, "groups are not a list of lists"),
    (lambda h: {**h, "groups": []}, "no param group"),
    (lambda h: {**h, "groups": [["a"], ["b", "a"]]}, "parameter 'a' twice"),
    (lambda h: _without(h, "config"), "no 'config'"),
    (lambda h: {**h, "config": [1]}, "config is a list"),
    (lambda h: {**h, "config": _without(h["config"], "eps")}, "config has no 'eps'"),
    (lambda h: {**h, "config": _without(h["config"], "n_queries")}, "config has no 'n_queries'"),
    (lambda h: _cfg(h, n_queries="1"), "config.n_queries is '1'"),
    (lambda h: _cfg(h, n_queries=1.0), "config.n_queries is 1.0"),
    (lambda h: _cfg(h, n_queries=0), "config.n_queries is 0"),
    (lambda h: _cfg(h, cge_coordinates=None), "config.cge_coordinates is None"),
    (lambda h: _cfg(h, epz=1e-3), "unknown field 'epz'"),
    (lambda h: _cfg(h, eps=-1.0), "config is invalid: ZOConfig.eps=-1.0"),
    (lambda h: _cfg(h, estimator="spsaa"), "config is invalid: .*estimator"),
    (lambda h: _cfg(h, betas=[0.9]), "config is invalid: ZOConfig.betas"),
]


@pytest.mark.parametrize("mutate,match", MALFORMED_HEADERS)
def test_malformed_headers_are_refused_by_name(tmp_path, mutate, match):
    """Headers with a valid tag (so validation, not the tag, is what refuses them)."""
    good = spec_header()
    header = mutate(json.loads(json.dumps(good)))
    line = json.dumps(header, sort_keys=True).encode() + b"\n"
    data = line + hashlib.sha256(line).digest()[:8] + spec_log(good, sample_records(good))[len(line) + 8 :]
    (tmp_path / "a.zot").write_bytes(data)
    with pytest.raises(TrajectoryError, match=match):
        read_log(tmp_path / "a.zot")
    (tmp_path / "empty.zot").write_bytes(line + hashlib.sha256(line).digest()[:8])
    with pytest.raises(TrajectoryError, match=match):
        read_log(tmp_path / "empty.zot")  # also with no record to disagree with
    written = (("format", FORMAT), ("version", VERSION), ("stream_version", STREAM_VERSION))
    if isinstance(header, dict) and all(header.get(k) == v for k, v in written):
        with pytest.raises(TrajectoryError, match=match):  # the writer refuses what cannot be read
            TrajectoryWriter(tmp_path / "w.zot", header, 0)


def test_headers_that_are_not_json_objects(tmp_path):
    for data, match in [
        (b"", "no header line"),
        (b'{"format": "zo-trajectory"', "no header line"),
        (b"\xff\xfe{}\n", "header is not valid JSON"),
        (b"[" * 100000 + b"\n", "header is not valid JSON"),
        (b'{"n": ' + b"9" * 5000 + b"}\n", "header is not valid JSON"),  # int digit limit
        (b"{}\n", "not a zo-trajectory log"),
    ]:
        (tmp_path / "a.zot").write_bytes(data)
        with pytest.raises(TrajectoryError, match=match):
            read_log(tmp_path / "a.zot")
    with pytest.raises(TrajectoryError, match="No trajectory log"):
        read_log(tmp_path / "missing.zot")


@pytest.mark.parametrize(
    "make_record,match",
    [
        (
            lambda h: spec_record(h, 0, grads=[1.0, 2.0]),
            "holds 2 projected gradients; the header's config implies 1",
        ),
        (lambda h: spec_record(h, 0, grads=[]), "holds 0 projected gradients"),
        (lambda h: spec_record(h, 0, lr=[0.1, 0.1], wd=[0.0, 0.0]), "learning rates for 2 param groups"),
        (lambda h: spec_record(h, 0, shifts=[[[1, 1e-3]]]), "passes are not a list of"),  # query 1 of 1
        (lambda h: spec_record(h, 0, shifts=[[[0, float("inf")]]]), "passes are not"),
        (lambda h: spec_record(h, 0, shifts={"a": 1}), "passes are not"),
        (lambda h: spec_record(h, 3), "record 0 is step 3, expected 0"),
    ],
)
def test_records_that_disagree_with_the_header_are_refused(tmp_path, make_record, match):
    header = spec_header()
    rec = make_record(header)
    (tmp_path / "a.zot").write_bytes(spec_log(header, [rec]))
    with pytest.raises(TrajectoryError, match=match):
        read_log(tmp_path / "a.zot")
    # the writer checks the same before writing: the log is left as it was
    w = TrajectoryWriter(tmp_path / "w.zot", header, 0)
    w.append(spec_record(header, 0))
    before = (tmp_path / "w.zot").read_bytes()
    rec = {**rec, "step": 1 if rec["step"] == 0 else 4}
    with pytest.raises(TrajectoryError, match="Cannot log step 1"):
        w.append(rec)
    w.close()
    assert (tmp_path / "w.zot").read_bytes() == before


def test_per_step_count_follows_the_estimator(tmp_path):
    header = spec_header(estimator="cge", cge_coordinates=3, n_queries=2)
    assert len(spec_record(header, 0)["grads"]) == 3
    skipped = spec_record(header, 1, skipped=True)
    (tmp_path / "a.zot").write_bytes(spec_log(header, [spec_record(header, 0), skipped]))
    assert [len(r["grads"]) for r in read_log(tmp_path / "a.zot").records] == [3, 0]
    (tmp_path / "b.zot").write_bytes(spec_log(header, [spec_record(header, 0, grads=[1.0, 2.0])]))
    with pytest.raises(TrajectoryError, match="holds 2 projected gradients; the header's config implies 3"):
        read_log(tmp_path / "b.zot")


@pytest.mark.parametrize("start", [0, 2, 6])
def test_resume_reopen_drops_the_end_record(tmp_path, start):
    path = tmp_path / "a.zot"
    header, records, sizes = write_sample(path)
    original = path.read_bytes()
    assert read_log(path).complete
    if start == 0:  # a fresh run at the same path starts a new log
        TrajectoryWriter(path, header, 0).close()
        assert read_log(path).records == []
        return
    w = TrajectoryWriter(path, header, start)
    assert path.read_bytes() == original[: sizes[start]]  # the kept records, byte for byte
    log = read_log(path)
    assert log.records == records[:start] and not log.complete
    w.append(spec_record(header, start, grads=[42.0]))
    w.finish(FINAL)
    log = read_log(path)
    assert [r["step"] for r in log.records] == list(range(start + 1)) and log.records[-1]["grads"] == [42.0]
    assert log.end == {"steps": start + 1, "final_hash": FINAL}


def test_resume_refuses_logs_it_cannot_continue(tmp_path):
    header = spec_header()
    path = tmp_path / "a.zot"
    write_sample(path)
    for other, match in [
        (_cfg(header, n_queries=2), "another config"),
        ({**header, "backend": "triton"}, "another backend"),
        ({**header, "groups": [["x"]]}, "another groups"),
    ]:
        with pytest.raises(TrajectoryError, match=match):
            TrajectoryWriter(path, other, 3)
    with pytest.raises(TrajectoryError, match="holds 6 steps before step 9"):
        TrajectoryWriter(path, header, 9)
    with pytest.raises(TrajectoryError, match="does not exist"):
        TrajectoryWriter(tmp_path / "missing.zot", header, 3)
    (tmp_path / "v1.zot").write_bytes(spec_log(v1_header(header), sample_records(header)))
    with pytest.raises(TrajectoryError, match="format version 1, which does not record its direction-stream"):
        TrajectoryWriter(tmp_path / "v1.zot", header, 3)
