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
        with Client(socket=d.path, timeout=10, numpy=False) as c:
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
    d = FakeDaemon(echo)
    try:
        with Client(socket=d.path, timeout=10) as c:
            a = np.arange(12, dtype=np.float32).reshape(3, 4)
            big = np.arange(P.INLINE_LIMIT, dtype=np.int64)
            out = c.infer("m", {"a": a, "big": big})
            assert out["out0"].dtype == np.float32 and (out["out0"] == a).all()
            assert (out["out1"] == big).all()
    finally:
        d.close()
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
