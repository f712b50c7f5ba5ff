"""The Python daemon protocol against the Rust one: the golden frames that
tests/protocol_cpu.rs writes (python/tests/data/frames) decode to the same
messages and re-encode byte for byte; damaged and hostile frames raise
ProtocolError only; frames and memfd tensors cross a real socket pair.
No library, no GPU, no numpy needed."""

import dataclasses
import os
import socket
import struct

import pytest

from pipeswitch import ArgumentError, Disconnected, ProtocolError
from pipeswitch import protocol as p

FRAMES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "frames")


def tensor(name, n):
    return p.Tensor(name, 11, [1, n // 4], p.Inline(bytes(i % 256 for i in range(n))))


def every_message():
    """The same list, in the same order, as every_message() in tests/protocol_cpu.rs."""
    timing = p.Timing(0.5, 0.25, 9.75, 10.5)
    return [
        p.Hello(p.ROLE_CLIENT, 42, ""),
        p.Hello(p.ROLE_WORKER, 7, "builtin"),
        p.Welcome(1, 0, "models", 3, bytes([9] * 128), 1 << 30, 64 << 20),
        p.Welcome(1, 0, "s", 0, b"", 0, 0),
        p.Error(5, 200, 'no model named "x"'),
        p.Infer(9, "bert", [tensor("input_ids", 64), tensor("mask", 0)]),
        p.Infer(10, "gpt2", [p.Tensor("big", 9, [8, 1024], p.Shared(4096, 32768))]),
        p.InferResult(9, [tensor("out", 128)], timing),
        p.Standby(3),
        p.Activate(p.Task(77, p.TASK_INFERENCE, "resnet152", 12, 256 << 20, False, [0, 4, 40, 150],
                          [tensor("images", 16)], 123_456_789)),
        p.TaskDone(77, 0, "", [tensor("logits", 40)], timing),
        p.TaskDone(78, 302, "CUDA error", [], p.Timing()),
        p.StatsRequest(),
        p.StatsReply(p.Stats(10, 1, 6, 4, 2, 1 << 30, 3, 2, 4, 1)),
        p.Shutdown(),
        p.Deactivate(),
        p.TrainSubmit(3, job()),
        p.TrainStatus(3, 1, 4, 120, 100, 4, 0, ""),
        p.TrainStatus(4, 1, 6, 7, 0, 0, 901, "ValueError: bad batch"),
        p.TrainQuery(5, 1, True),
        p.TrainStart(p.TrainTask(80, 1, dataclasses.replace(job(), policy=p.POLICY_INFERENCE_FIRST,
                                                            preempt=p.PREEMPT_BOUNDARY, save=p.SAVE_RESIDENT),
                                 "/dev/shm/pipeswitch-train-1", 100, 987_654_321)),
        p.Preempt(80, p.PREEMPT_ABANDON, p.SAVE_HOST, 55),
        p.TrainProgress(80, p.PROGRESS_CHECKPOINT, 110, 110, 480 << 20),
        p.TrainStopped(80, p.STOP_PREEMPTED, 111, 110, 0, "", 1.5, 12.25),
        p.TrainSubmit(6, dataclasses.replace(job(), save=p.SAVE_AUTO)),
        # Appended: input areas.
        p.InputArea(11, 32 << 20),
        p.InputAreaReady(11, 3, 32 << 20),
        p.AreaAdd(3, 32 << 20),
        p.AreaDrop(3),
        p.Infer(12, "resnet152", [p.Tensor("images", 11, [8, 3, 224, 224], p.Area(3, 0, 4_816_896)),
                                  tensor("scale", 4)]),
    ]


def job():
    return p.TrainJob("resnet152-train", "pipeswitch.train:resnet152_job", p.PREEMPT_ABANDON, p.SAVE_HOST,
                      p.POLICY_TIME_SHARE, 0.75, 5000, 200, 1000, 50)


def golden():
    return ["%02d-%02d.bin" % (m.KIND, i) for i, m in enumerate(every_message())]


def test_golden_files_are_every_message():
    assert sorted(f for f in os.listdir(FRAMES) if f.endswith(".bin")) == sorted(golden())


@pytest.mark.parametrize("i", range(len(every_message())))
def test_golden_frame_decodes_and_reencodes_byte_for_byte(i):
    m = every_message()[i]
    with open(os.path.join(FRAMES, golden()[i]), "rb") as f:
        frame = f.read()
    h, back = p.decode_frame(frame)
    assert back == m
    assert h.kind == m.KIND and h.fds == 0 and h.body_len == len(frame) - p.HEADER_BYTES
    assert p.encode_frame(back) == frame
    assert p.encode_frame(m) == frame


def test_every_truncation_and_extension_is_a_protocol_error():
    for m in every_message():
        frame = p.encode_frame(m)
        body = frame[p.HEADER_BYTES:]
        for cut in range(len(body)):
            with pytest.raises(ProtocolError):
                p.decode_body(m.KIND, body[:cut])
        with pytest.raises(ProtocolError):
            p.decode_body(m.KIND, body + b"\0")
        for cut in range(len(frame)):
            with pytest.raises(ProtocolError):
                p.decode_frame(frame[:cut])
        with pytest.raises(ProtocolError):
            p.decode_frame(frame + b"\0")


def test_random_damage_raises_only_protocol_errors():
    import random

    rng = random.Random(7)
    for m in every_message():
        frame = bytearray(p.encode_frame(m))
        for _ in range(300):
            f = bytearray(frame)
            for _ in range(rng.randint(1, 4)):
                f[rng.randrange(len(f))] = rng.randrange(256)
            try:
                p.decode_frame(bytes(f))
            except ProtocolError:
                pass


def test_hostile_headers_and_lengths_are_refused():
    ok = p.Header(4, 10, 0).encode()
    with pytest.raises(ProtocolError, match="magic"):
        p.Header.decode(b"X" + ok[1:])
    bad = ok[:4] + struct.pack("<H", p.VERSION + 1) + ok[6:]
    with pytest.raises(ProtocolError) as e:
        p.Header.decode(bad)
    assert "version %d" % (p.VERSION + 1) in str(e.value) and "version %d" % p.VERSION in str(e.value)
    assert e.value.status == 700
    with pytest.raises(ProtocolError, match="exceeds"):
        p.Header.decode(ok[:8] + struct.pack("<I", p.MAX_BODY + 1) + ok[12:])
    with pytest.raises(ProtocolError, match="files"):
        p.Header.decode(ok[:12] + struct.pack("<I", 2))
    with pytest.raises(ProtocolError, match="unknown message kind"):
        p.decode_body(999, b"")
    # A list that claims 2^32-1 tensors in a short body.
    body = struct.pack("<QI", 9, 1) + b"m" + struct.pack("<I", 0xFFFFFFFF)
    with pytest.raises(ProtocolError, match="do not fit"):
        p.decode_body(4, body)
    # A list over MAX_LIST even with the bytes present.
    body = struct.pack("<QI", 9, 1) + b"m" + struct.pack("<I", p.MAX_LIST + 1) + b"\0" * (17 * (p.MAX_LIST + 1))
    with pytest.raises(ProtocolError, match="do not fit"):
        p.decode_body(4, body)
    # A string longer than the body, and one over MAX_STR.
    with pytest.raises(ProtocolError):
        p.decode_body(4, struct.pack("<QI", 9, 1 << 30))
    with pytest.raises(ProtocolError, match="at most"):
        p.decode_body(3, struct.pack("<QII", 1, 1, p.MAX_STR + 1) + b"a" * (p.MAX_STR + 1))
    # Not UTF-8.
    with pytest.raises(ProtocolError, match="UTF-8"):
        p.decode_body(3, struct.pack("<QII", 1, 1, 2) + b"\xff\xfe")
    # Too many dimensions, shared ranges that overflow or are too large.
    t = tensor("x", 4)
    t.shape = [1] * 9
    with pytest.raises(ProtocolError, match="dimensions"):
        p.decode_frame(p.encode_frame(p.Infer(1, "m", [t])))
    for off, n in [((1 << 64) - 1, 2), (0, p.MAX_SHARED_TENSOR + 1)]:
        t = p.Tensor("x", 1, [], p.Shared(off, n))
        with pytest.raises(ProtocolError, match="out of range"):
            p.decode_frame(p.encode_frame(p.Infer(1, "m", [t])))
    # Unknown placement, role, task kind; bad boolean; bad arena handle.
    f = bytearray(p.encode_frame(p.Infer(1, "m", [tensor("x", 4)])))
    f[-(4 + 4 + 1)] = 3
    with pytest.raises(ProtocolError, match="placement"):
        p.decode_frame(bytes(f))
    f = bytearray(p.encode_frame(p.Hello(p.ROLE_CLIENT, 1, "")))
    f[p.HEADER_BYTES] = 9
    with pytest.raises(ProtocolError, match="role"):
        p.decode_frame(bytes(f))
    act = every_message()[9]
    f = bytearray(p.encode_frame(act))
    f[p.HEADER_BYTES + 8] = 3
    with pytest.raises(ProtocolError, match="task kind"):
        p.decode_frame(bytes(f))
    f = bytearray(p.encode_frame(act))
    f[p.HEADER_BYTES + 8 + 1 + 4 + len("resnet152") + 16] = 2
    with pytest.raises(ProtocolError, match="boolean"):
        p.decode_frame(bytes(f))
    with pytest.raises(ProtocolError, match="arena handle"):
        p.decode_frame(p.encode_frame(p.Welcome(1, 0, "s", 0, b"\1" * 5)))
    with pytest.raises(ProtocolError, match="at most 128"):
        p.decode_frame(p.encode_frame(p.Welcome(1, 0, "s", 0, b"\1" * 129)))
    # Too large to send inline: refused before sending (as in Rust: an argument error).
    with pytest.raises(ArgumentError):
        p.encode_frame(p.Infer(1, "m", [tensor("x", p.MAX_BODY)]))
    # Unencodable values are protocol errors too.
    with pytest.raises(ProtocolError):
        p.encode_frame(p.Standby(-1))
    with pytest.raises(ProtocolError):
        p.encode_frame(p.Error(1, 2, b"bytes"))


def test_frames_and_memfd_tensors_cross_a_socket_pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        small = bytes(range(100))
        large = bytes(i * 7 % 251 for i in range(3 * p.INLINE_LIMIT + 5))
        large2 = bytes(i % 13 for i in range(p.INLINE_LIMIT + 1))
        exact = b"\5" * p.INLINE_LIMIT
        tensors, fd = p.pack_tensors([("small", 1, [100], small), ("large", 1, [len(large)], large),
                                      ("large2", 1, [len(large2)], bytearray(large2)), ("exact", 1, [], exact)])
        assert isinstance(tensors[0].data, p.Inline) and isinstance(tensors[3].data, p.Inline)
        assert isinstance(tensors[1].data, p.Shared) and isinstance(tensors[2].data, p.Shared)
        assert fd is not None
        p.send(a, p.Infer(3, "m", tensors), fd)
        os.close(fd)
        p.send(a, p.StatsRequest())
        msg, fd = p.recv(b)
        assert fd is not None
        assert os.get_inheritable(fd) is False
        out = p.unpack_tensors(msg.inputs, fd)
        assert [x[1] for x in out] == [small, large, large2, exact]
        assert [x[0].name for x in out] == ["small", "large", "large2", "exact"]
        # A range beyond the file, and a shared tensor without a file.
        t = p.Tensor("x", 1, [], p.Shared(len(large), len(large2) + 1))
        with pytest.raises(ProtocolError, match="claims"):
            p.unpack_tensors([t], fd)
        with pytest.raises(ProtocolError, match="did not come"):
            p.unpack_tensors([t], None)
        os.close(fd)
        assert p.recv(b) == (p.StatsRequest(), None)
        # No shared tensors: no file.
        assert p.pack_tensors([("s", 1, [1], b"x")])[1] is None
    # Large tensors are read in parallel ranges: every byte in its place,
    # into a bytearray and into a buffer given by into().
    n = p.PARALLEL_READ_BYTES + 12345
    big = bytes((i * 31 + i // 4096) % 256 for i in range(n))
    head = bytes(range(256)) * 17
    tensors, fd = p.pack_tensors([("head", 1, [len(head)], head), ("big", 1, [n], big)])
    try:
        out = p.unpack_tensors(tensors, fd)
        assert [bytes(x[1]) for x in out] == [head, big]
        given = {}
        out = p.unpack_tensors(tensors, fd, into=lambda i, k: given.setdefault(i, bytearray(k + 7)))
        assert bytes(out[1][1]) == big and bytes(given[1][:n]) == big and given[1][n:] == bytearray(7)
    finally:
        os.close(fd)
    # A clean close between frames is None; in the middle of one, an error.
    a, b = socket.socketpair()
    with b:
        a.close()
        assert p.recv(b) is None
    a, b = socket.socketpair()
    with b:
        a.sendall(p.encode_frame(p.Standby(1))[:-2])
        a.close()
        with pytest.raises(ProtocolError, match="middle"):
            p.recv(b)
    a, b = socket.socketpair()
    with b:
        a.sendall(p.encode_frame(p.Standby(1))[:7])
        a.close()
        with pytest.raises(ProtocolError):
            p.recv(b)
    # Sending to a peer that left: Disconnected, not SIGPIPE.
    a, b = socket.socketpair()
    b.close()
    with a, pytest.raises(Disconnected):
        p.send(a, p.Shutdown())
    # A timeout while waiting: Disconnected.
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(0.05)
        with pytest.raises(Disconnected):
            p.recv(b)


def test_files_must_match_what_the_frame_announces():
    # Announced, not sent.
    a, b = socket.socketpair()
    with a, b:
        a.sendall(p.encode_frame(p.Shutdown(), 1))
        with pytest.raises(ProtocolError, match="did not come"):
            p.recv(b)
    # Sent, not announced (and the received fd is closed, not leaked).
    a, b = socket.socketpair()
    with a, b:
        _, fd = p.pack_tensors([("x", 1, [], b"\1" * (p.INLINE_LIMIT + 1))])
        a.sendmsg([p.encode_frame(p.Shutdown(), 0)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ProtocolError, match="announced none"):
            p.recv(b)
        assert len(os.listdir("/proc/self/fd")) == before
        # Two files with one frame.
        a.sendmsg([p.encode_frame(p.Shutdown(), 1)],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("ii", fd, fd))])
        with pytest.raises(ProtocolError, match="more than one"):
            p.recv(b)
        assert len(os.listdir("/proc/self/fd")) == before
        os.close(fd)


def test_a_rust_frame_with_a_file_is_received_from_python():
    """The Rust encoder's Infer with a Shared tensor (golden 04-06) sent with a
    memfd large enough: Python receives both."""
    with open(os.path.join(FRAMES, "04-06.bin"), "rb") as f:
        frame = bytearray(f.read())
    frame[12:16] = struct.pack("<I", 1)
    fd = os.memfd_create("t")
    os.ftruncate(fd, 4096 + 32768)
    os.pwrite(fd, b"\7" * 32768, 4096)
    a, b = socket.socketpair()
    with a, b:
        a.sendmsg([bytes(frame)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        os.close(fd)
        msg, got = p.recv(b)
        [(t, data)] = p.unpack_tensors(msg.inputs, got)
        os.close(got)
        assert t.name == "big" and t.shape == [8, 1024] and data == b"\7" * 32768


def test_socket_paths_follow_the_rust_rule(monkeypatch):
    monkeypatch.setenv("PIPESWITCH_SOCKET_DIR", "/x/y")
    assert p.default_socket_dir() == "/x/y"
    monkeypatch.delenv("PIPESWITCH_SOCKET_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/5")
    assert p.default_socket_dir() == "/run/user/5/pipeswitch"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "")
    assert p.default_socket_dir() == "/tmp/pipeswitch-%d" % os.geteuid()
    assert p.socket_path("/d", 3) == "/d/gpu3.sock"


def test_error_of_maps_statuses_to_exception_classes():
    import pipeswitch

    assert isinstance(p.error_of(200, "m"), pipeswitch.NotFound)
    assert isinstance(p.error_of(702, "m"), pipeswitch.Refused)
    assert isinstance(p.error_of(302, "m"), pipeswitch.CudaError)
    e = p.error_of(0, "odd")
    assert isinstance(e, ProtocolError) and e.status == 700
    assert p.error_of(203, "full").name == "PS_ERR_ARENA_FULL"


def test_os_failures_are_pipeswitch_errors():
    import pipeswitch

    a, b = socket.socketpair()
    a.close()
    with pytest.raises(pipeswitch.OsError):
        p.send(a, p.Shutdown())
    with pytest.raises(pipeswitch.OsError):
        p.recv(a)
    b.close()
    with pytest.raises(ArgumentError, match="contiguous"):
        p.pack_tensors([("x", 1, [1], object())])
    # Multi-byte and multi-dimensional buffers are packed as their bytes.
    import array

    ts, fd = p.pack_tensors([("x", 11, [2], array.array("f", [1.0, 2.0]))])
    assert fd is None and ts[0].data.data == array.array("f", [1.0, 2.0]).tobytes()
    ts, _ = p.pack_tensors([("y", 1, [2, 2], memoryview(b"abcd").cast("B", (2, 2)))])
    assert ts[0].data.data == b"abcd"


def test_damaged_frames_over_a_socket_raise_protocol_errors_only():
    import random

    rng = random.Random(11)
    frames = [p.encode_frame(m) for m in every_message()]
    for i in range(200):
        f = bytearray(rng.choice(frames))
        for _ in range(rng.randint(1, 3)):
            f[rng.randrange(len(f))] = rng.randrange(256)
        if rng.random() < 0.3:
            f = f[:rng.randrange(len(f))]
        a, b = socket.socketpair()
        with b:
            a.sendall(bytes(f))
            a.close()
            try:
                while p.recv(b) is not None:
                    pass
            except ProtocolError:
                pass


def test_hostile_area_messages_are_refused():
    # Area sizes of 0 or over MAX_SHARED_TENSOR, in each of the three messages that carry one.
    for n in (0, p.MAX_SHARED_TENSOR + 1, (1 << 64) - 1):
        for m in (p.InputArea(1, n), p.InputAreaReady(1, 2, n), p.AreaAdd(2, n)):
            with pytest.raises(ProtocolError, match="input area of %d bytes" % n):
                p.decode_frame(p.encode_frame(m))
    for m in (p.InputArea(1, 1), p.InputAreaReady(1, 0, p.MAX_SHARED_TENSOR), p.AreaAdd((1 << 64) - 1, 1),
              p.AreaDrop(0)):
        assert p.decode_frame(p.encode_frame(m))[1] == m
    # Area tensors whose range overflows or is too large.
    for off, n in [((1 << 64) - 1, 2), (0, p.MAX_SHARED_TENSOR + 1), (1, (1 << 64) - 1)]:
        t = p.Tensor("x", 1, [], p.Area(3, off, n))
        with pytest.raises(ProtocolError, match="of area 3 is out of range"):
            p.decode_frame(p.encode_frame(p.Infer(1, "m", [t])))
    t = p.Tensor("x", 1, [], p.Area(3, 0, p.MAX_SHARED_TENSOR))
    assert p.decode_frame(p.encode_frame(p.Infer(1, "m", [t])))[1].inputs == [t]
    # Values that do not fit a u64 are not encoded.
    for m in (p.InputArea(-1, 5), p.AreaAdd(1 << 64, 5), p.AreaDrop(-3)):
        with pytest.raises(ProtocolError, match="cannot encode"):
            p.encode_frame(m)
    with pytest.raises(ProtocolError, match="cannot encode"):
        p.encode_frame(p.Infer(1, "m", [p.Tensor("x", 1, [], p.Area(-1, 0, 0))]))


def test_area_layout_is_the_rust_one():
    small, big = p.INLINE_LIMIT, p.INLINE_LIMIT + 1
    assert p.area_layout([]) == ([], 0)
    assert p.area_layout([small, 0, 5]) == ([None, None, None], 0)
    # From 0, each larger tensor at the next multiple of 256, in order.
    assert p.area_layout([big, small, big, 300, 4_816_896]) == (
        [0, None, 65_792, None, 131_584], 131_584 + 4_816_896)
    assert p.area_layout([4_816_896, 8_582_496]) == ([0, 4_816_896], 4_816_896 + 8_582_496)
    assert p.AREA_ALIGN == 256


def test_areas_are_created_sealed_and_mapped_read_only():
    fd, w = p.create_area(1 << 20)
    try:
        import fcntl

        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        assert not seals & fcntl.F_SEAL_WRITE, "the client writes every request's inputs into it"
        assert os.fstat(fd).st_size == 1 << 20 and len(w) == 1 << 20
        assert os.get_inheritable(fd) is False
        with pytest.raises(OSError):
            os.ftruncate(fd, 1 << 19)
        p.check_area_file(fd, 1 << 20)
        r = p.map_area(fd, 4096)
        assert len(r) == 4096
        w[100:104] = b"abcd"
        assert r[100:104] == b"abcd", "the reader sees the writer's bytes (one shared file)"
        with pytest.raises(TypeError):
            r[0:1] = b"x"  # read-only
        with pytest.raises(ArgumentError, match="in a file of"):
            p.map_area(fd, (1 << 20) + 1)
        r.close()
    finally:
        w.close()
        os.close(fd)
    # A file not sealed against shrinking is refused, as the daemon refuses it.
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096)
        with pytest.raises(ArgumentError, match="F_SEAL_SHRINK") as e:
            p.map_area(fd, 4096)
        assert e.value.status == 101
    finally:
        os.close(fd)
    phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    more_than_memory = [phys + 4096] if phys + 4096 <= p.MAX_SHARED_TENSOR else []
    for n in [0, -1, p.MAX_SHARED_TENSOR + 1] + more_than_memory:
        with pytest.raises(ArgumentError, match="input area of"):
            p.create_area(n)


def test_area_tensors_are_read_from_the_mappings_without_a_copy():
    fd, w = p.create_area(1 << 20)
    a, b = socket.socketpair()
    try:
        big = bytes(i * 7 % 251 for i in range(p.INLINE_LIMIT + 1000))
        offsets, end = p.area_layout([len(big), 4])
        w[offsets[0]:offsets[0] + len(big)] = big
        tensors = [p.Tensor("big", 1, [len(big)], p.Area(5, offsets[0], len(big))),
                   p.Tensor("s", 1, [4], p.Inline(b"\1\2\3\4"))]
        # The area's file crosses a socket with AreaAdd; the worker maps it.
        p.send(a, p.AreaAdd(5, 1 << 20), fd)
        msg, got = p.recv(b)
        assert msg == p.AreaAdd(5, 1 << 20) and got is not None
        r = p.map_area(got, msg.bytes)
        os.close(got)
        p.send(a, p.Infer(9, "m", tensors))
        msg, none = p.recv(b)
        assert none is None
        asked = []
        out = p.unpack_tensors(msg.inputs, None, into=lambda i, n: asked.append(i), areas={5: r})
        assert [bytes(d) for _, d in out] == [big, b"\1\2\3\4"] and asked == []
        view = out[0][1]
        assert isinstance(view, memoryview) and view.readonly
        w[offsets[0]] = 0xEE  # a view, not a copy
        assert view[0] == 0xEE
        del view, out
        # An area not held, a range outside it, no areas at all: errors before anything is read.
        for ts, areas, what in [
            ([p.Tensor("x", 1, [1], p.Area(6, 0, 1))], {5: r}, "names input area 6, which is not held here"),
            ([p.Tensor("x", 1, [1], p.Area(5, 1 << 20, 1))], {5: r}, "lies outside input area 5 of 1048576 bytes"),
            ([p.Tensor("x", 1, [1], p.Area(5, 0, (1 << 20) + 1))], {5: r}, "lies outside"),
            ([p.Tensor("x", 1, [1], p.Area(5, 0, 1))], None, "not held here"),
        ]:
            given = []
            with pytest.raises(ProtocolError, match=what):
                p.unpack_tensors([p.Tensor("f", 1, [4], p.Shared(0, 4))] + ts, None, into=lambda i, n: given.append(i),
                                 areas=areas)
            assert given == []
        # The whole area, and an empty range at its end.
        out = p.unpack_tensors([p.Tensor("all", 1, [1 << 20], p.Area(5, 0, 1 << 20)),
                                p.Tensor("none", 1, [0], p.Area(5, 1 << 20, 0))], None, areas={5: r})
        assert len(out[0][1]) == 1 << 20 and bytes(out[1][1]) == b""
        del out
        r.close()
    finally:
        a.close()
        b.close()
        w.close()
        os.close(fd)
