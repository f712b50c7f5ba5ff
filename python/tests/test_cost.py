"""The fitted cost model, closed-loop planning and the cost record kept in
the store (issue 15), on the CPU: synthetic "GPUs" with known costs."""

import math
import uuid

import pytest

import pipeswitch as ps


def unique(prefix="t"):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:12])


@pytest.fixture
def store():
    name = unique("store")
    s = ps.Store.create(name, 8 << 20)
    try:
        yield s
    finally:
        s.close()
        try:
            ps.Store.unlink(name)
        except ps.NotFound:
            pass


T = [0.5, 0.2, 0.9, 0.1, 0.4, 0.3, 0.7, 0.2]
X = [0.3, 0.6, 0.2, 0.8, 0.1, 0.5, 0.2, 0.4]


def test_default_cost_model_is_the_two_overhead_model():
    for a, b in [(0.0, 0.0), (0.1, 0.05), (2.0, 0.0)]:
        assert ps.plan_groups_cost(T, X, ps.CostModel(a, b)) == ps.plan_groups(T, X, a, b)
        starts, ms = ps.plan_groups(T, X, a, b)
        assert ps.plan_makespan_cost(T, X, starts, ps.CostModel(a, b)) == ms


def test_extended_terms():
    # t = x = [1, 1], L = 0.5, κ = 2, σ = 0.5 (hand-computed in the Rust tests): both plans 6.5 ms.
    m = ps.CostModel(first_kernel_ms=0.5, exec_scale=2.0, copy_slowdown=0.5)
    assert ps.plan_makespan_cost([1, 1], [1, 1], [0], m) == 6.5
    assert ps.plan_makespan_cost([1, 1], [1, 1], [0, 1], m) == 6.5
    with pytest.raises(ps.ArgumentError):
        ps.plan_groups_cost(T, X, ps.CostModel(exec_scale=0.0))
    with pytest.raises(ps.ArgumentError):
        ps.plan_groups_cost(T, X[:3], ps.CostModel())


def test_closed_loop_recovers_a_known_gpu():
    truth = ps.CostModel(0.004, 0.2, first_kernel_ms=0.3, exec_scale=0.7)
    calls = []

    def gpu(plan):
        calls.append(plan)
        return ps.plan_makespan_cost(T, X, plan, truth)

    plan, rec = ps.plan_closed_loop(T, X, gpu, base=ps.CostModel(0.004, 0.005), extra_plans=[[0, 4]])
    _, optimum = ps.plan_groups_cost(T, X, truth)
    assert rec.measured_ms == ps.plan_makespan_cost(T, X, plan, truth)
    assert rec.measured_ms <= optimum * 1.01
    assert abs(rec.measured_ms / rec.predicted_ms - 1) <= 0.03
    assert rec.groups == len(plan)
    assert [0, 4] in calls
    assert rec.model.transfer_overhead_ms == 0.004  # a is kept


def test_closed_loop_raises_the_measure_exception():
    class Boom(Exception):
        pass

    def gpu(plan):
        raise Boom("no GPU today")

    with pytest.raises(Boom):
        ps.plan_closed_loop(T, X, gpu)
    with pytest.raises(ps.PipeSwitchError):
        ps.plan_closed_loop(T, X, lambda plan: math.nan)


def test_cost_record_is_kept_with_the_model(store):
    store.add_model("m", [("l%d" % i, [("w%d" % i, "U8", (16,), bytes(16))]) for i in range(3)])
    assert store.get_cost("m") is None
    rec = ps.CostRecord(ps.CostModel(0.004, 0.02, 0.3, 0.9, 0.05, 7.5, 0.01), 53.5, 8.4, 8.5, 3, 1, 0.012, 1800000000)
    store.set_cost("m", rec)
    assert store.get_cost("m") == rec
    other = ps.Store.open(store.name)
    try:
        assert other.get_cost("m") == rec
    finally:
        other.close()
    with pytest.raises(ps.ArgumentError):
        store.set_cost("m", ps.CostRecord(ps.CostModel(), 1.0, math.nan, 1.0, 1, 0, 0.0))
    assert store.get_cost("m") == rec
    with pytest.raises(ps.NotFound):
        store.get_cost("nope")


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_calibrate_module_with_a_synthetic_gpu(store, monkeypatch):
    """pipeswitch.torch.calibrate_module's loop with no GPU: a fake torch, a
    fake worker and a clock that the fake forward advances by the known
    costs of the plan in force (the ready run when no switch came first)."""
    import contextlib
    import sys
    import types

    fake_torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(synchronize=lambda device=None: None),
        no_grad=contextlib.nullcontext,
        Tensor=type("Tensor", (), {}),
        nn=types.SimpleNamespace(Embedding=type("Embedding", (), {})),
    )
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    import pipeswitch.torch as pst

    clock = _FakeClock()
    monkeypatch.setattr(pst, "time", clock)
    n, bw, a = 12, 0.5, 0.004  # copies as long as the kernels
    store.add_model("m", [("l%d" % i, [("w%d" % i, "U8", (5000 * (1 + i % 3),), bytes(5000 * (1 + i % 3)))])
                          for i in range(n)])
    x = [0.02 + 0.01 * (i % 4) for i in range(n)]
    store.set_layer_exec_ms("m", x)
    info = store.model_info("m")
    t = [layer.bytes / (bw * 1e6) for layer in info.layers]
    truth = ps.CostModel(a, 0.01, first_kernel_ms=0.05, exec_scale=0.8, copy_slowdown=0.1, floor_ms=0.25)
    before_calls = []

    class Module:
        _parameters, _buffers = {}, {}

        def named_modules(self):
            return [("", self)]

        def __call__(self, *args):
            ms = ps.plan_makespan_cost(t, x, worker.plan, truth) if worker.switched else 0.25
            worker.switched = False
            clock.now += ms / 1e3

    class Worker:
        device = "cuda:0"
        group_exec_overhead_ms = 0.005

        def __init__(self):
            self.store = store
            self._models = {"m": types.SimpleNamespace(info=info, module=Module())}
            self.plan, self.switched, self.plans_set = [0], False, []

        def _link(self):
            return bw, a

        def set_plan(self, name, plan):
            self.plan = list(plan)
            self.plans_set.append(list(plan))

        def switch_to(self, name):
            self.switched = True

        def synchronize(self):
            pass

    worker = Worker()
    r = pst.calibrate_module(worker, "m", (), before=lambda: before_calls.append(1), reps=3,
                             extra_plans=[[0, 6]])
    rec = r["record"]
    _, optimum = ps.plan_groups_cost(t, x, truth)
    assert r["needed_layers"] == n and r["ready_ms"] == pytest.approx(0.25)
    assert worker.plan == r["plan"]  # the worker keeps the chosen plan
    assert rec.measured_ms == pytest.approx(ps.plan_makespan_cost(t, x, r["plan"], truth))
    assert rec.measured_ms <= optimum * 1.01
    assert abs(rec.measured_ms / rec.predicted_ms - 1) <= 0.03
    assert rec.bandwidth_gbps == bw
    assert store.get_cost("m") == rec
    assert [0, 6] in worker.plans_set
    assert len(r["plan"]) > 1
    # Another model ran before every measured run: 3 ready runs, 1 + 3 per plan (the last set_plan is the choice).
    assert len(before_calls) == 3 + 4 * (len(worker.plans_set) - 1)
    # predict_plan agrees with the cost model over all layers (no tables here).
    assert pst.predict_plan(info, Module(), rec.model, [0, 6], bw) == \
        ps.plan_makespan_cost(t, x, [0, 6], rec.model)
