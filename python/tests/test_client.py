"""The Python client against a tiny fake daemon (a thread on a temporary Unix
socket speaking pipeswitch.protocol): hello/welcome, results inline and in a
memfd, error replies mapped to exception classes, stale answers skipped,
stats, and no daemon at all. No library, no GPU, no numpy needed."""

import os
import socket
import tempfile
import threading

import pytest

import pipeswitch
from pipeswitch import protocol as P
from pipeswitch.client import Client, from_bytes, to_bytes


class FakeDaemon:
    """Serves one connection with ``handler(sock, msg, fd)`` per message after
    the welcome (or answers hello with ``hello_reply``)."""

    def __init__(self, handler=None, hello_reply=None):
        self.dir = tempfile.mkdtemp(prefix="ps-fake-")
        self.path = P.socket_path(self.dir, 0)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.handler = handler
        self.hello_reply = hello_reply or P.Welcome(4242, 0, "models", 0)
        self.seen = []
        self.errors = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            conn, _ = self.listener.accept()
            with conn:
                msg, fd = P.recv(conn)
                self.seen.append(msg)
                P.send(conn, self.hello_reply)
                while True:
                    got = P.recv(conn)
                    if got is None:
                        return
                    msg, fd = got
                    self.seen.append(msg)
                    try:
                        self.handler(conn, msg, fd)
                    finally:
                        if fd is not None:
                            os.close(fd)
        except Exception as e:  # surfaced by the test through .errors
            self.errors.append(e)

    def close(self):
        self.listener.close()
        self.thread.join(5)
        os.unlink(self.path)
        os.rmdir(self.dir)


def echo(conn, msg, fd):
    """Answers Infer with its inputs (doubled bytes for "twice"), "missing"
    with NotFound, "busy" with a stale result first; StatsRequest with counters."""
    if isinstance(msg, P.StatsRequest):
        P.send(conn, P.StatsReply(P.Stats(requests=3, hits=2, workers=1)))
        return
    assert isinstance(msg, P.Infer)
    if msg.model == "missing":
        P.send(conn, P.Error(msg.request_id, 200, "no model named %r" % msg.model))
        return
    if msg.model == "busy":
        P.send(conn, P.InferResult(msg.request_id + 100, [], P.Timing()))
        P.send(conn, P.Error(msg.request_id - 1, 702, "stale"))
    ins = P.unpack_tensors(msg.inputs, fd)
    outs = [("out%d" % i, t.dtype, t.shape, b) for i, (t, b) in enumerate(ins)]
    tensors, ofd = P.pack_tensors(outs)
    try:
        P.send(conn, P.InferResult(msg.request_id, tensors, P.Timing(1.0, 2.0, 3.0, 4.0)), ofd)
    finally:
        if ofd is not None:
            os.close(ofd)


def test_infer_round_trips_inline_and_shared_tensors():
    d = FakeDaemon(echo)
    try:
        with Client(socket=d.path, timeout=10, numpy=False, input_area=False) as c:
            assert (c.daemon_pid, c.device, c.store) == (4242, 0, "models")
            big = bytes(i % 251 for i in range(4 * (P.INLINE_LIMIT // 4 + 100)))
            out = c.infer("m", [("x", b"\1\0\0\0\2\0\0\0", "int32", (2,)),
                                ("big", big, "F32", [len(big) // 4])])
            assert out["out0"] == (b"\1\0\0\0\2\0\0\0", "I32", (2,))
            assert out["out1"] == (big, "F32", (len(big) // 4,))
            assert (out.timing.queued_ms, out.timing.activation_ms, out.timing.total_ms) == (1.0, 2.0, 4.0)
            out = c.infer("m", {"a": (bytearray(b"\0" * 6), pipeswitch.PS_DTYPE_F16, [3])})
            assert out["out0"] == (b"\0" * 6, "F16", (3,))
            s = c.stats()
            assert (s.requests, s.hits, s.workers) == (3, 2, 1)
        assert c.closed
        c.close()
    finally:
        d.close()
    assert not d.errors
    hello, infer1 = d.seen[0], d.seen[1]
    assert hello == P.Hello(P.ROLE_CLIENT, os.getpid(), "")
    assert infer1.request_id == 1 and [t.name for t in infer1.inputs] == ["x", "big"]
    assert isinstance(infer1.inputs[1].data, P.Shared)


def test_errors_map_to_exception_classes_and_stale_answers_are_skipped():
    d = FakeDaemon(echo)
    try:
        c = Client(socket=d.path, timeout=10, numpy=False)
        with pytest.raises(pipeswitch.NotFound, match="no model named") as e:
            c.infer("missing", [])
        assert e.value.status == 200 and e.value.name == "PS_ERR_NOT_FOUND"
        # The connection is still usable; stale answers are skipped.
        out = c.infer("busy", {"x": (b"\7", "U8", [1])})
        assert out["out0"] == (b"\7", "U8", (1,)) and out.request_id == 2
        # Bad inputs are refused before anything is sent.
        with pytest.raises(pipeswitch.ArgumentError, match="bytes"):
            c.infer("m", {"x": (b"\7\7", "F32", [1])})
        with pytest.raises(pipeswitch.ArgumentError, match="dtype"):
            c.infer("m", {"x": (b"\7", "nonsense", [1])})
        with pytest.raises(pipeswitch.ArgumentError):
            c.infer("m", {"x": (b"\7", "U8", None)})
        c.close()
        with pytest.raises(pipeswitch.Disconnected):
            c.infer("m", [])
    finally:
        d.close()
    assert not d.errors


def test_refusals_and_broken_daemons():
    # The daemon refuses the hello.
    d = FakeDaemon(echo, hello_reply=P.Error(0, 702, "busy daemon"))
    try:
        with pytest.raises(pipeswitch.Refused, match="busy daemon"):
            Client(socket=d.path, timeout=10)
    finally:
        d.close()

    # The daemon closes the connection in the middle of a request.
    def hang_up(conn, msg, fd):
        conn.shutdown(socket.SHUT_RDWR)

    d = FakeDaemon(hang_up)
    try:
        c = Client(socket=d.path, timeout=10)
        with pytest.raises(pipeswitch.Disconnected, match="closed"):
            c.infer("m", [])
        c.close()
    finally:
        d.close()

    # The daemon answers garbage: a ProtocolError.
    def garbage(conn, msg, fd):
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    d = FakeDaemon(garbage)
    try:
        c = Client(socket=d.path, timeout=10)
        with pytest.raises(pipeswitch.ProtocolError, match="magic"):
            c.infer("m", [])
        assert c.closed  # out of step: not used again
        with pytest.raises(pipeswitch.Disconnected, match="closed"):
            c.stats()
    finally:
        d.close()

    # Nobody answers in time: Disconnected.
    d = FakeDaemon(lambda conn, msg, fd: None)
    try:
        c = Client(socket=d.path, timeout=0.2)
        with pytest.raises(pipeswitch.Disconnected, match="timed out"):
            c.infer("m", [])
        assert not c.closed  # between frames: a later answer is skipped as stale
        c.close()
    finally:
        d.close()


def test_no_daemon_is_disconnected_and_the_default_path_follows_the_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("PIPESWITCH_SOCKET_DIR", str(tmp_path))
    with pytest.raises(pipeswitch.Disconnected) as e:
        Client(device=3)
    assert str(tmp_path / "gpu3.sock") in str(e.value) and "pipeswitch serve" in str(e.value)


def test_tensor_conversions_without_numpy():
    assert to_bytes(b"\0" * 8, "F64", [1])[1:] == (pipeswitch.PS_DTYPE_F64, [1])
    with pytest.raises(pipeswitch.ArgumentError):
        to_bytes(object(), "F32", [1])
    with pytest.raises(pipeswitch.ArgumentError, match="dimensions"):
        to_bytes(b"", "F32", [0] * 9)
    assert from_bytes(b"\0\0", pipeswitch.PS_DTYPE_BF16, [1]) == (b"\0\0", "BF16", (1,))


def test_numpy_arrays_in_and_out():
    np = pytest.importorskip("numpy")
    for area in (False, True):
        h = AreaDaemon()
        d = FakeDaemon(h)
        try:
            with Client(socket=d.path, timeout=10, input_area=area) as c:
                a = np.arange(12, dtype=np.float32).reshape(3, 4)
                big = np.arange(P.INLINE_LIMIT, dtype=np.int64)
                out = c.infer("m", {"a": a, "big": big[::-1]})
                assert out["out0"].dtype == np.float32 and (out["out0"] == a).all()
                assert (out["out1"] == big[::-1]).all()
            assert h.placements == [["Inline", "Area" if area else "Shared"]]
        finally:
            d.close()
            h.close()
        assert not d.errors


def test_training_jobs_are_submitted_queried_and_cancelled():
    jobs = {}

    def handler(conn, msg, fd):
        if isinstance(msg, P.TrainSubmit):
            # A stale status of an earlier request first: skipped.
            P.send(conn, P.TrainStatus(msg.request_id - 1, 9, 2))
            jobs[7] = msg.job
            P.send(conn, P.TrainStatus(msg.request_id, 7, 1))
        elif isinstance(msg, P.TrainQuery) and msg.job_id == 7:
            P.send(conn, P.TrainStatus(msg.request_id, 7, 7 if msg.cancel else 4, 42, 40, 3))
        else:
            P.send(conn, P.Error(msg.request_id, 200, "no training job %d" % msg.job_id))

    d = FakeDaemon(handler)
    try:
        with Client(d.path, timeout=5) as c:
            st = c.train("r152", "pipeswitch.train:resnet152_job", preempt="boundary", save="resident",
                         policy="time-share", share=0.75, period_ms=1000, checkpoint_every=10)
            assert (st.job_id, st.state_name) == (7, "waiting")
            j = jobs[7]
            assert (j.preempt, j.save, j.policy, j.share, j.period_ms, j.checkpoint_every) == (
                P.PREEMPT_BOUNDARY, P.SAVE_RESIDENT, P.POLICY_TIME_SHARE, 0.75, 1000, 10)
            st = c.train_status(7)
            assert (st.state_name, st.iteration, st.checkpoint, st.preemptions) == ("paused", 42, 40, 3)
            assert c.train_status(7, cancel=True).state_name == "cancelled"
            with pytest.raises(pipeswitch.NotFound, match="no training job 8"):
                c.train_status(8)
            with pytest.raises(pipeswitch.ArgumentError, match="preempt must be one of"):
                c.train("x", "m:f", preempt="later")
    finally:
        d.close()
    assert not d.errors


def test_the_train_command_line(capsys):
    states = iter([4, 4, 2, 2, 5])

    def handler(conn, msg, fd):
        P.send(conn, P.TrainStatus(msg.request_id, 3, next(states), 10, 0, 1))

    d = FakeDaemon(handler)
    try:
        from pipeswitch.train import main
        assert main(["--socket", d.path, "status", "3", "--watch", "5"]) == 0
    finally:
        d.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "job 3 paused: iteration 10, checkpoint 0, preemptions 1"
    assert [line.split(" ", 1)[1] for line in out[1:]] == [
        "job 3 running: iteration 10, checkpoint 0, preemptions 1",
        "job 3 finished: iteration 10, checkpoint 0, preemptions 1"]


# ---------------------------------------------------------------------------
# Input areas
# ---------------------------------------------------------------------------

class AreaDaemon:
    """A handler for FakeDaemon that keeps input areas as the daemon does:
    checks and maps the file, refuses areas over ``limit`` (702), replaces a
    client's earlier area, and answers Infer from its own mappings (echo);
    ``delay``: model or area size -> seconds to wait before answering."""

    def __init__(self, limit=1 << 40, delay=None):
        self.limit = limit
        self.delay = delay or {}
        self.maps = {}
        self.current = None
        self.next_id = 7
        self.asked = []      # sizes of every InputArea
        self.placements = []  # per Infer: the placement class of each input
        self.raw = []         # per Infer: the bytes at each area tensor's range, read from the mapping

    def __call__(self, conn, msg, fd):
        import time

        if isinstance(msg, P.InputArea):
            self.asked.append(msg.bytes)
            time.sleep(self.delay.get(msg.bytes, 0))
            if msg.bytes > self.limit:
                P.send(conn, P.Error(msg.request_id, 702, "an input area of %d bytes is over the limit of %d"
                                     % (msg.bytes, self.limit)))
                return
            try:
                m = P.map_area(fd, msg.bytes)
            except pipeswitch.ArgumentError as e:
                P.send(conn, P.Error(msg.request_id, 101, e.message))
                return
            if self.current is not None:
                self.maps.pop(self.current).close()
            self.current, self.next_id = self.next_id, self.next_id + 1
            self.maps[self.current] = m
            P.send(conn, P.InputAreaReady(msg.request_id, self.current, msg.bytes))
            return
        if isinstance(msg, P.Infer):
            time.sleep(self.delay.get(msg.model, 0))
            self.placements.append([type(t.data).__name__ for t in msg.inputs])
            for t in msg.inputs:
                if isinstance(t.data, P.Area) and t.data.area != self.current:
                    P.send(conn, P.Error(msg.request_id, 101, "area %d is not the client's" % t.data.area))
                    return
            self.raw.append([bytes(self.maps[t.data.area][t.data.offset:t.data.offset + t.data.bytes])
                             for t in msg.inputs if isinstance(t.data, P.Area)])
            ins = P.unpack_tensors(msg.inputs, fd, areas=self.maps)
            outs = [("out%d" % i, t.dtype, t.shape, bytes(b)) for i, (t, b) in enumerate(ins)]
            del ins
            tensors, ofd = P.pack_tensors(outs)
            try:
                P.send(conn, P.InferResult(msg.request_id, tensors, P.Timing()), ofd)
            finally:
                if ofd is not None:
                    os.close(ofd)
            return
        echo(conn, msg, fd)

    def close(self):
        for m in self.maps.values():
            m.close()


def pattern(n, seed):
    import random

    return random.Random(seed).randbytes(n)


def test_large_inputs_go_through_an_input_area_reserved_once():
    h = AreaDaemon()
    d = FakeDaemon(h)
    try:
        with Client(socket=d.path, timeout=10, numpy=False) as c:
            assert c.input_area_bytes == 0 and c.input_area_id is None
            # Small inputs only: no area.
            out = c.infer("m", {"s": (b"\1\2\3\4", "U8", [4])})
            assert out["out0"][0] == b"\1\2\3\4" and h.asked == []
            # Large ones: an area of 16 MiB (the least) first, then they are in it,
            # each at the next multiple of 256 from 0; small ones stay inline.
            a, b = pattern(P.INLINE_LIMIT + 1, 7), pattern(100_000, 13)
            out = c.infer("m", [("a", a, "U8", [len(a)]), ("s", b"\5" * 8, "U8", [8]), ("b", b, "U8", [len(b)])])
            assert [out["out%d" % i][0] for i in range(3)] == [a, b"\5" * 8, b]
            assert h.asked == [16 << 20] and c.input_area_bytes == 16 << 20 and c.input_area_id == 7
            infer = d.seen[-1]
            assert [t.data for t in infer.inputs] == [P.Area(7, 0, len(a)), P.Inline(b"\5" * 8),
                                                      P.Area(7, 65_792, len(b))]
            assert h.raw[-1] == [a, b]
            # The next request reuses it (no new area), its bytes at the same offsets.
            a2 = pattern(len(a), 11)
            out = c.infer("m", [("a", a2, "U8", [len(a2)]), ("s", b"\6" * 8, "U8", [8]), ("b", b, "U8", [len(b)])])
            assert out["out0"][0] == a2 and h.raw[-1] == [a2, b] and h.asked == [16 << 20]
            assert d.seen[-1].inputs[0].data == P.Area(7, 0, len(a2))
            # More than it holds: a larger one (the next power of two) replaces it.
            big = pattern((16 << 20) + 1, 3)
            out = c.infer("m", {"big": (big, "U8", [len(big)])})
            assert out["out0"][0] == big and h.asked == [16 << 20, 32 << 20]
            assert (c.input_area_id, c.input_area_bytes) == (8, 32 << 20)
            assert d.seen[-1].inputs[0].data == P.Area(8, 0, len(big))
            # Smaller requests stay in it.
            out = c.infer("m", {"a": (a, "U8", [len(a)])})
            assert out["out0"][0] == a and h.asked == [16 << 20, 32 << 20] and h.raw[-1] == [a]
            # numpy-free stats in between: still usable.
            assert c.stats().requests == 3
        assert c.input_area_bytes == 0, "closed with the client"
    finally:
        d.close()
        h.close()
    assert not d.errors


def test_a_refused_area_keeps_the_old_one_and_is_not_asked_again():
    h = AreaDaemon(limit=16 << 20)
    d = FakeDaemon(h)
    try:
        with Client(socket=d.path, timeout=10, numpy=False) as c:
            a = pattern(P.INLINE_LIMIT + 1, 5)
            assert c.infer("m", {"a": (a, "U8", [len(a)])})["out0"][0] == a
            assert h.asked == [16 << 20] and c.input_area_id == 7
            # 17 MiB: asks for 32 MiB, refused: the inputs go in a file of their own.
            big = pattern(17 << 20, 9)
            assert c.infer("m", {"big": (big, "U8", [len(big)])})["out0"][0] == big
            assert h.asked == [16 << 20, 32 << 20] and h.placements[-1] == ["Shared"]
            assert "over the limit" in c.area_refusal
            # ... and it is not asked for again, nor a larger one; the old area still serves.
            big2 = pattern(40 << 20, 2)
            assert c.infer("m", {"big": (big, "U8", [len(big)])})["out0"][0] == big
            assert c.infer("m", {"big": (big2, "U8", [len(big2)])})["out0"][0] == big2
            assert h.asked == [16 << 20, 32 << 20] and h.placements[-2:] == [["Shared"], ["Shared"]]
            assert c.infer("m", {"a": (a, "U8", [len(a)])})["out0"][0] == a
            assert h.placements[-1] == ["Area"] and c.input_area_id == 7
            # Asked for explicitly: the daemon's error, the old area kept.
            with pytest.raises(pipeswitch.Refused, match="over the limit"):
                c.reserve_inputs(64 << 20)
            assert (c.input_area_id, c.input_area_bytes) == (7, 16 << 20)
            assert c.infer("m", {"a": (a, "U8", [len(a)])})["out0"][0] == a and h.placements[-1] == ["Area"]
            # Bad sizes are refused here, before anything is sent.
            for n in (0, -5, P.MAX_SHARED_TENSOR + 1):
                with pytest.raises(pipeswitch.ArgumentError, match="input area of"):
                    c.reserve_inputs(n)
            assert h.asked == [16 << 20, 32 << 20, 64 << 20]
    finally:
        d.close()
        h.close()
    assert not d.errors


def test_areas_only_when_asked_for_and_never_over_the_automatic_limit(monkeypatch):
    import pipeswitch.client as client_mod

    h = AreaDaemon()
    d = FakeDaemon(h)
    try:
        with Client(socket=d.path, timeout=10, numpy=False, input_area=False) as c:
            a = pattern(P.INLINE_LIMIT + 1, 5)
            assert c.infer("m", {"a": (a, "U8", [len(a)])})["out0"][0] == a
            assert h.asked == [] and h.placements[-1] == ["Shared"]
            # Reserved explicitly: used (the size asked for, not a power of two).
            assert c.reserve_inputs(100_000) == 100_000
            assert c.infer("m", {"a": (a, "U8", [len(a)])})["out0"][0] == a
            assert h.asked == [100_000] and h.placements[-1] == ["Area"] and h.raw[-1] == [a]
            # Too large for it: a file, and no new area (not automatic).
            b = pattern(100_001, 3)
            assert c.infer("m", {"b": (b, "U8", [len(b)])})["out0"][0] == b
            assert h.asked == [100_000] and h.placements[-1] == ["Shared"]
    finally:
        d.close()
        h.close()
    assert not d.errors

    monkeypatch.setattr(client_mod, "AUTO_AREA_MAX", 16 << 20)
    h = AreaDaemon()
    d = FakeDaemon(h)
    try:
        with Client(socket=d.path, timeout=10, numpy=False) as c:
            big = pattern((16 << 20) + 1, 9)
            assert c.infer("m", {"big": (big, "U8", [len(big)])})["out0"][0] == big
            assert h.asked == [] and h.placements[-1] == ["Shared"], "32 MiB is over the automatic limit"
            exact = pattern(16 << 20, 9)
            assert c.infer("m", {"x": (exact, "U8", [len(exact)])})["out0"][0] == exact
            assert h.asked == [16 << 20] and h.placements[-1] == ["Area"]
    finally:
        d.close()
        h.close()
    assert not d.errors


def test_the_area_is_not_written_while_a_request_that_names_it_may_be_read():
    """A request naming the area timed out here: until its answer comes, the
    next requests send their inputs in files, so the daemon's worker never
    reads bytes of a later request; an area accepted after its reservation
    timed out replaced the client's at the daemon: the old one is dropped."""
    h = AreaDaemon(delay={"slow": 1.0, 32 << 20: 1.0})
    d = FakeDaemon(h)
    try:
        c = Client(socket=d.path, timeout=10, numpy=False)
        a, a2 = pattern(P.INLINE_LIMIT + 1, 5), pattern(P.INLINE_LIMIT + 1, 6)
        c.infer("m", {"a": (a, "U8", [len(a)])})
        c._sock.settimeout(0.3)
        with pytest.raises(pipeswitch.Disconnected, match="timed out"):
            c.infer("slow", {"a": (a, "U8", [len(a)])})
        c._sock.settimeout(10)
        out = c.infer("m", {"a": (a2, "U8", [len(a2)])})
        assert out["out0"][0] == a2 and h.placements[-1] == ["Shared"]
        assert h.raw[-2] == [a], "the slow request read its own bytes"
        # Its answer came (skipped): the area is used again.
        out = c.infer("m", {"a": (a2, "U8", [len(a2)])})
        assert out["out0"][0] == a2 and h.placements[-1] == ["Area"] and h.raw[-1] == [a2]
        # A reservation that timed out, accepted later: the area held here is dropped.
        c._sock.settimeout(0.3)
        with pytest.raises(pipeswitch.Disconnected, match="timed out"):
            c.reserve_inputs(32 << 20)
        assert c.input_area_id == 7
        c._sock.settimeout(10)
        c.stats()
        assert c.input_area_bytes == 0 and h.current == 8
        out = c.infer("m", {"a": (a, "U8", [len(a)])})
        assert out["out0"][0] == a and c.input_area_id == 9 and h.placements[-1] == ["Area"]
        c.close()
    finally:
        d.close()
        h.close()
    assert not d.errors


def test_an_area_answer_that_does_not_fit_what_was_asked_is_a_protocol_error():
    answers = iter([(1, 2), (1, 0.5), (0, 1)])

    def handler(conn, msg, fd):
        area, times = next(answers)
        P.send(conn, P.InputAreaReady(msg.request_id, area, int(times * msg.bytes)))

    d = FakeDaemon(handler)
    try:
        c = Client(socket=d.path, timeout=10, numpy=False)
        for what in ("area 1 of 8192", "area 1 of 2048", "area 0 of 4096"):
            with pytest.raises(pipeswitch.ProtocolError, match="accepted an input area of 4096 bytes as " + what):
                c.reserve_inputs(4096)
            assert c.input_area_bytes == 0
        c.close()
    finally:
        d.close()
    assert not d.errors
