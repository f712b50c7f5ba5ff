"""pipeswitch.torch: register_module on the CPU; Worker on a GPU (skipped
without CUDA or without the CUDA driver)."""

import os
import subprocess
import sys
import textwrap
import uuid

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import pipeswitch as ps  # noqa: E402
from pipeswitch.torch import (ROOT_LAYER, TABLE_MIN_BYTES, Worker, execution_order, plan_module,  # noqa: E402
                              register_module, table_layers)

PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not ps.driver_available(), reason="needs a CUDA GPU and driver")


@pytest.fixture
def store():
    name = "torch-%s" % uuid.uuid4().hex[:12]
    s = ps.Store.create(name, 160 << 20)
    try:
        yield s
    finally:
        s.close()
        ps.Store.unlink(name)


def stored_tensor(store, model, info, name, like):
    t = info.tensor(name)
    data = bytearray(store.read(model, t.offset, t.bytes))
    return torch.frombuffer(data, dtype=like.dtype).reshape(like.shape) if t.bytes else like.new_empty(like.shape)


class Branchy(nn.Module):
    """Defined in one order, called in another; the root owns a parameter;
    one module is never called."""

    def __init__(self):
        super().__init__()
        self.late = nn.Linear(8, 4)
        self.unused = nn.Linear(4, 4)
        self.early = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.scale = nn.Parameter(torch.full((8,), 2.0))

    def forward(self, x):
        y = self.early(x) * self.scale
        return self.late(torch.relu(self.norm(y)))


def test_execution_order_sequential():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 2)))
    assert execution_order(m, (torch.randn(3, 4),)) == ["0", "2", "3.0", "3.1"]


def test_register_branching_model(store):
    torch.manual_seed(0)
    m = Branchy()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    info = register_module(store, "branchy", m, torch.randn(5, 4), measure=False)
    assert m.training  # mode restored
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k  # the order pass ran in eval mode: no BN stat update
    assert [layer.name for layer in info.layers] == [ROOT_LAYER, "early", "norm", "late", "unused"]
    assert info.layers[2].tensors == ("norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
                                      "norm.num_batches_tracked")
    assert info.tensor("norm.num_batches_tracked").dtype == "I64"
    sd = m.state_dict()
    assert sorted(t.name for t in info.tensors) == sorted(sd)
    for name, v in sd.items():
        assert torch.equal(stored_tensor(store, "branchy", info, name, v), v), name


class TiedLM(nn.Module):
    def __init__(self, vocab=10, dim=6):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.block = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.proj = nn.Linear(dim, dim)
        self.proj2 = nn.Linear(dim, dim)
        self.proj2.weight = self.proj.weight  # tied, but proj2 keeps its own bias

    def forward(self, ids):
        h = self.wte(ids)
        h = self.proj2(self.proj(self.block(h)))
        return self.lm_head(h)


def test_tied_weights_are_stored_once(store):
    m = TiedLM()
    info = register_module(store, "tied", m, torch.tensor([[1, 2, 3]]), measure=False)
    names = [t.name for t in info.tensors]
    assert "lm_head.weight" not in names and "proj2.weight" not in names
    assert names == ["wte.weight", "block.weight", "block.bias", "proj.weight", "proj.bias", "proj2.bias"]
    # lm_head owns nothing else: not a layer; proj2 keeps its bias.
    assert [layer.name for layer in info.layers] == ["wte", "block", "proj", "proj2"]
    assert torch.equal(stored_tensor(store, "tied", info, "wte.weight", m.wte.weight.detach()), m.wte.weight)


def test_dtypes_and_non_contiguous(store):
    m = nn.Linear(4, 3).to(torch.bfloat16)
    m.register_buffer("mask", torch.ones(3, 4, dtype=torch.bool))
    m.register_buffer("t", torch.arange(12.0).reshape(3, 4).t())  # not contiguous
    info = register_module(store, "dt", m, torch.randn(2, 4, dtype=torch.bfloat16), measure=False)
    assert [t.dtype for t in info.tensors] == ["BF16", "BF16", "BOOL", "F32"]
    assert info.tensor("t").shape == (4, 3)
    got = stored_tensor(store, "dt", info, "t", torch.empty(4, 3))
    assert torch.equal(got, m.t)
    got = stored_tensor(store, "dt", info, "weight", m.weight.detach())
    assert torch.equal(got, m.weight)


class TinyLM(nn.Module):
    """Transformer-like: the root owns a buffer (entered first, as BERT's
    embeddings module), a token table (vocab x dim fp32), a small position
    table, then Linear / LayerNorm layers."""

    def __init__(self, vocab=8192, dim=64, seq=16, depth=2, max_norm=None):
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim))
        self.tok = nn.Embedding(vocab, dim, max_norm=max_norm)
        self.pos = nn.Embedding(seq, dim)
        self.fcs = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 8)

    def forward(self, ids):
        h = (self.tok(ids) + self.pos(torch.arange(ids.shape[-1], device=ids.device))) * self.scale
        for fc in self.fcs:
            h = torch.relu(fc(h)) + h
        return self.head(self.norm(h))


def tiny_ids(vocab=8192, seq=16, batch=4, seed=3):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


TINY_EXEC_ORDER = [ROOT_LAYER, "tok", "pos", "fcs.0", "fcs.1", "norm", "head"]


def test_token_tables_are_stored_last(store):
    torch.manual_seed(4)
    m = TinyLM()
    assert m.tok.weight.numel() * 4 >= TABLE_MIN_BYTES > m.pos.weight.numel() * 4
    info = register_module(store, "lm", m, (tiny_ids(),), measure=False)
    assert [layer.name for layer in info.layers] == [ROOT_LAYER, "pos", "fcs.0", "fcs.1", "norm", "head", "tok"]
    assert info.layers[-1].tensors == ("tok.weight",)
    assert info.tensor("tok.weight").offset >= info.tensor("head.bias").offset  # copied last
    for name, v in m.state_dict().items():
        assert torch.equal(stored_tensor(store, "lm", info, name, v), v), name
    assert table_layers(info, m) == [6]
    assert table_layers(info, on_meta(TinyLM)) == [6]  # a skeleton says the same

    info = register_module(store, "lm-in-order", m, (tiny_ids(),), measure=False, tables_last=False)
    assert [layer.name for layer in info.layers] == TINY_EXEC_ORDER
    assert table_layers(info, m) == []


def test_two_tables_keep_their_order_and_small_ones_stay(store):
    m = TinyLM(seq=8192)  # the position table is a table too (2 MiB)
    info = register_module(store, "two", m, (tiny_ids(seq=8),), measure=False)
    assert [layer.name for layer in info.layers] == [ROOT_LAYER, "fcs.0", "fcs.1", "norm", "head", "tok", "pos"]
    assert table_layers(info, on_meta(lambda: TinyLM(seq=8192))) == [5, 6]
    small = TinyLM(vocab=100)
    info = register_module(store, "small", small, (tiny_ids(vocab=100),), measure=False)
    assert [layer.name for layer in info.layers] == TINY_EXEC_ORDER


def test_tied_or_renormalised_tables_stay_in_place(store):
    big = TiedLM(vocab=8192, dim=64)  # wte (2 MiB) is read whole by the tied lm_head
    info = register_module(store, "tied-big", big, torch.tensor([[1, 2, 3]]), measure=False)
    assert [layer.name for layer in info.layers] == ["wte", "block", "proj", "proj2"]
    assert table_layers(info, on_meta(lambda: TiedLM(vocab=8192, dim=64))) == []
    # max_norm renormalises rows in place: never read from the store.
    info = register_module(store, "max-norm", TinyLM(max_norm=1.0), (tiny_ids(),), measure=False)
    assert [layer.name for layer in info.layers] == TINY_EXEC_ORDER


def test_plans_end_with_one_group_of_tables(store):
    m = TinyLM()
    info = register_module(store, "lm", m, (tiny_ids(),), measure=False)
    n = len(info.layers)
    bw, a, b = 2.0, 0.002, 0.001  # slow link: the optimum has several groups
    # Not measured yet: the default plan is one group for the layers, one for the tables.
    worker = Worker.__new__(Worker)  # Worker.plan's inputs, without a GPU
    worker.store, worker._models = store, {}
    worker.bandwidth_gbps, worker.group_transfer_overhead_ms, worker.group_exec_overhead_ms = bw, a, b
    skel = on_meta(TinyLM)
    assert worker.plan("lm", skel) == [0, n - 1]
    exec_ms = [0.01, 0.05, 0.2, 0.2, 0.02, 0.05, 0.01]
    store.set_layer_exec_ms("lm", exec_ms)
    starts, makespan = plan_module(store, "lm", skel, bw, a, b)
    transfer = [layer.bytes / (bw * 1e6) for layer in info.layers]
    prefix, prefix_ms = ps.plan_groups(transfer[:n - 1], exec_ms[:n - 1], a, b)
    assert starts == prefix + [n - 1] and len(starts) > 2
    assert makespan == pytest.approx(prefix_ms)
    # The whole-model optimum would count the table's 2 MiB before the last layer runs.
    assert makespan < ps.plan_model(store, "lm", bw, a, b)[1]
    assert worker.plan("lm", skel) == starts
    # Without tables (or without a module) it is plan_model's plan.
    info2 = register_module(store, "in-order", m, (tiny_ids(),), measure=False, tables_last=False)
    store.set_layer_exec_ms("in-order", [0.01] * len(info2.layers))
    assert plan_module(store, "in-order", skel, bw, a, b) == ps.plan_model(store, "in-order", bw, a, b)
    assert worker.plan("lm") == ps.plan_model(store, "lm", bw, a, b)[0]


# ---------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------

def mlp(width=64):
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def on_meta(factory):
    with torch.device("meta"):
        return factory()


@gpu
def test_worker_runs_a_registered_mlp(store):
    torch.manual_seed(0)
    ref_model = mlp()
    x = torch.randn(16, 32)
    with torch.no_grad():
        ref = ref_model(x)
    info = register_module(store, "mlp", ref_model, (x,), device="cuda:0")
    assert info.measured and all(t >= 0 for t in info.exec_ms)

    arena = ps.Arena.create(0, 64 << 20, 8 << 20)
    worker = Worker(0, arena=arena, store=store)
    skel = worker.attach(on_meta(mlp), "mlp")
    base, size = arena.base(), arena.size()
    for name, p in skel.named_parameters():
        assert p.device == torch.device("cuda", 0) and base <= p.data_ptr() < base + size, name
    with pytest.raises(RuntimeError, match="switch_to"):
        skel(x.cuda())  # not loaded yet
    worker.switch_to("mlp")
    with torch.no_grad():
        y = skel(x.cuda())
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-5)
    # The data pointers are the stored offsets in the region.
    region = worker._models["mlp"].offset
    for t in info.tensors:
        module_tensor = skel.get_parameter(t.name)
        assert module_tensor.data_ptr() == base + region + t.offset
        assert worker.switch.tensor_ptr(t.name) == base + region + t.offset
    worker.close()
    arena.close()


@gpu
def test_worker_switches_between_models_and_keeps_ties(store):
    torch.manual_seed(1)
    a, b = mlp(64), TiedLM()
    xa, xb = torch.randn(4, 32), torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ra, rb = a(xa), b(xb)
    register_module(store, "a", a, (xa,), device="cuda:0")
    register_module(store, "b", b, (xb,), device="cuda:0")
    arena = ps.Arena.create(0, 32 << 20, 4 << 20)
    worker = Worker(0, arena=arena, store=store)
    sa = worker.attach(on_meta(lambda: mlp(64)), "a")
    sb = worker.attach(on_meta(TiedLM), "b", plan=[0, 2])
    assert sb.lm_head.weight is sb.wte.weight and sb.proj2.weight is sb.proj.weight
    with torch.no_grad():
        for name, x, ref, mod in [("a", xa, ra, sa), ("b", xb, rb, sb), ("a", xa, ra, sa), ("b", xb, rb, sb)]:
            worker.switch_to(name)
            torch.testing.assert_close(mod(x.cuda()).cpu(), ref, rtol=1e-5, atol=1e-5)
        # "a" has its own region: still resident after switching to "b".
        torch.testing.assert_close(sa(xa.cuda()).cpu(), ra, rtol=1e-5, atol=1e-5)
    assert worker.current == "b"
    worker.close()
    arena.close()


@gpu
def test_per_layer_groups_and_a_shared_region(store):
    """Per-layer groups on a model large enough for the copies to take a
    while: the forward right after switch_to must wait for each group. Two
    models share one region: switching to B without a host sync must not
    overwrite A's weights under A's running forward, and A is unusable
    afterwards until switched back."""
    torch.manual_seed(2)
    width = 2048
    ma, mb = mlp(width), mlp(width)
    x = torch.randn(64, 32)
    with torch.no_grad():
        ra, rb = ma(x), mb(x)
    register_module(store, "A", ma, (x,), measure=False)
    register_module(store, "B", mb, (x,), measure=False)
    nbytes = store.model_info("A").bytes
    arena = ps.Arena.create(0, nbytes + (8 << 20), 4 << 20)
    region = arena.alloc(nbytes)
    worker = Worker(0, arena=arena, store=store)
    per_layer = list(range(len(store.model_info("A").layers)))
    sa = worker.attach(on_meta(lambda: mlp(width)), "A", region, plan=per_layer)
    sb = worker.attach(on_meta(lambda: mlp(width)), "B", region, plan=per_layer)
    xc = x.cuda()
    # Hold A's last layer back on the GPU (~10 ms): B's copy, started right
    # after, would overwrite A's weights under it without the ordering.
    slow = sa[-1].register_forward_pre_hook(lambda mod, args: torch.cuda._sleep(20_000_000))
    with torch.no_grad():
        for _ in range(3):
            worker.switch_to("A")
            ya = sa(xc)
            worker.switch_to("B")  # no host sync in between
            yb = sb(xc)
            torch.testing.assert_close(ya.cpu(), ra, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(yb.cpu(), rb, rtol=1e-4, atol=1e-4)
        with pytest.raises(RuntimeError, match="not loaded"):
            sa(xc)
    slow.remove()
    assert worker.switch.n_groups() == len(per_layer)
    worker.close()
    arena.close()


@gpu
def test_install_allocator_is_refused_after_cuda_init():
    torch.zeros(1, device="cuda")
    arena = ps.Arena.create(0, 128 << 20, 64 << 20)
    with pytest.raises(RuntimeError, match="before CUDA is initialised"):
        Worker.install_allocator(arena)
    arena.close()


@gpu
def test_install_allocator_in_a_fresh_process():
    code = textwrap.dedent("""
        import uuid, torch, pipeswitch as ps
        from pipeswitch.torch import Worker, register_module
        # The workspace must hold PyTorch's cuBLAS workspace (32 MiB on Hopper) too.
        arena = ps.Arena.create(0, 160 << 20, 128 << 20)
        Worker.install_allocator(arena)
        x = torch.randn(256, 256, device="cuda")
        y = x @ x
        torch.cuda.synchronize()
        used, _ = ps.workspace_usage()
        off, nbytes = arena.workspace()
        lo = arena.base() + off
        assert used > 0, used
        assert lo <= y.data_ptr() < lo + nbytes, (hex(y.data_ptr()), hex(lo))
        # A model attached to the same arena runs with its activations in the workspace.
        store = ps.Store.create("alloc-" + uuid.uuid4().hex[:8], 16 << 20)
        m = torch.nn.Linear(256, 256)
        register_module(store, "lin", m, (torch.randn(2, 256),), measure=False)
        w = Worker(0, store=store)  # the installed arena
        with torch.device("meta"):
            skel = torch.nn.Linear(256, 256)
        w.attach(skel, "lin")
        w.switch_to("lin")
        with torch.no_grad():
            out = skel(x[:2])
        torch.testing.assert_close(out.cpu(), m(x[:2].cpu()).detach(), rtol=1e-4, atol=1e-4)
        ps.Store.unlink(store.name)
        print("OK")
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def big_lm():
    return TinyLM(vocab=32768, dim=256, depth=4)  # a 32 MiB token table


def table_spy(skel):
    """Records the token table's address at each call (after the worker's
    own pre-hook has run)."""
    seen = []
    skel.tok.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.data_ptr()))
    return seen


def switch_held_back(worker, name, cycles=50_000_000):
    """switch_to with the copies held back on the GPU (~25 ms): they start
    only after the current stream's work, so nothing has arrived when the
    forward right after is enqueued. A first, plain switch (synchronized)
    page-locks the store beforehand, outside the held-back one."""
    if not getattr(worker, "_warmed", False):
        worker.switch_to(name)
        worker.synchronize()
        worker._warmed = True
    torch.cuda._sleep(cycles)
    worker.switch_to(name)


@gpu
def test_token_table_is_read_from_the_host_while_in_flight(store):
    torch.manual_seed(5)
    ref_model = big_lm()
    ids = tiny_ids(vocab=32768)
    with torch.no_grad():
        ref = ref_model(ids)
    info = register_module(store, "lm", ref_model, (ids,), measure=False)
    n = len(info.layers)
    assert info.layers[-1].name == "tok"
    arena = ps.Arena.create(0, info.bytes + (8 << 20), 4 << 20)
    worker = Worker(0, arena=arena, store=store)
    skel = worker.attach(on_meta(big_lm), "lm", plan=list(range(n)))  # the table: last of n groups
    assert worker._models["lm"].tables == [n - 1]
    tok = info.tensor("tok.weight")
    arena_ptr = arena.base() + worker._models["lm"].offset + tok.offset
    seen = table_spy(skel)
    x = ids.cuda()
    with torch.no_grad():
        switch_held_back(worker, "lm")
        assert not worker.switch.group_ready(n - 1)
        y_switch = skel(x)
        host_ptr = worker.switch.host_model_ptr() + tok.offset
        assert skel.tok.weight.data_ptr() == arena_ptr  # given back after the call
        assert isinstance(skel.tok.weight, nn.Parameter) and not skel.tok.weight.requires_grad
        worker.synchronize()
        assert worker.switch.group_ready(n - 1)
        y_ready = skel(x)  # the same forward from the arena (the device path)
    assert seen == [host_ptr, arena_ptr]
    assert host_ptr != arena_ptr
    assert torch.equal(y_switch, y_ready)
    torch.testing.assert_close(y_ready.cpu(), ref, rtol=1e-4, atol=1e-4)

    # Again under inference_mode, switching to the model that is loaded already.
    with torch.inference_mode():
        switch_held_back(worker, "lm")
        y_inference = skel(x)
        worker.synchronize()
        y_inference_ready = skel(x)
    assert seen[2:] == [host_ptr, arena_ptr]
    assert torch.equal(y_inference, y_ready) and torch.equal(y_inference_ready, y_ready)
    worker.close()
    arena.close()


@gpu
def test_token_table_groups_default_plans_and_waited_groups(store):
    torch.manual_seed(6)
    ref_model = big_lm()
    ids = tiny_ids(vocab=32768)
    with torch.no_grad():
        ref = ref_model(ids)
    info = register_module(store, "lm", ref_model, (ids,), measure=False)
    n = len(info.layers)
    tok = info.tensor("tok.weight")
    arena = ps.Arena.create(0, info.bytes + (8 << 20), 4 << 20)
    worker = Worker(0, arena=arena, store=store)
    x = ids.cuda()

    # Default plan without times: the layers, then the table as a group of its own.
    skel = worker.attach(on_meta(big_lm), "lm")
    assert worker._models["lm"].plan == [0, n - 1]
    seen = table_spy(skel)
    with torch.no_grad():
        switch_held_back(worker, "lm")
        y = skel(x)
        host_ptr = worker.switch.host_model_ptr() + tok.offset
        worker.synchronize()
        y_ready = skel(x)
    arena_ptr = arena.base() + worker._models["lm"].offset + tok.offset
    assert seen == [host_ptr, arena_ptr]
    assert torch.equal(y, y_ready)
    torch.testing.assert_close(y_ready.cpu(), ref, rtol=1e-4, atol=1e-4)
    worker.detach("lm")

    # One group: the root (entered first) makes the stream wait for the whole
    # model, so the table then reads the arena although it has not arrived yet.
    skel = worker.attach(on_meta(big_lm), "lm", plan=[0])
    seen = table_spy(skel)
    arena_ptr = arena.base() + worker._models["lm"].offset + tok.offset
    with torch.no_grad():
        switch_held_back(worker, "lm")
        y_one = skel(x)
        assert not worker.switch.group_ready(0)
        worker.synchronize()
    assert seen == [arena_ptr]
    assert torch.equal(y_one, y_ready)
    worker.detach("lm")

    # Measured: the default plan is plan_module's, tables last.
    info = register_module(store, "lm-measured", ref_model, (ids,), device="cuda:0")
    assert info.measured
    skel = worker.attach(on_meta(big_lm), "lm-measured")
    plan = worker._models["lm-measured"].plan
    assert plan[-1] == n - 1 and plan[:-1] == plan_module(
        store, "lm-measured", skel, worker.bandwidth_gbps, worker.group_transfer_overhead_ms,
        worker.group_exec_overhead_ms)[0][:-1]
    with torch.no_grad():
        worker.switch_to("lm-measured")
        y_measured = skel(x)
        worker.synchronize()
    assert torch.equal(y_measured, y_ready)
    worker.close()
    arena.close()


@gpu
def test_tables_in_place_keep_the_group_waits(store):
    """tables_last=False: the table is layer 0 and waits for group 0 as before."""
    torch.manual_seed(7)
    ref_model = big_lm()
    ids = tiny_ids(vocab=32768)
    with torch.no_grad():
        ref = ref_model(ids)
    info = register_module(store, "lm", ref_model, (ids,), measure=False, tables_last=False)
    n = len(info.layers)
    arena = ps.Arena.create(0, info.bytes + (8 << 20), 4 << 20)
    worker = Worker(0, arena=arena, store=store)
    skel = worker.attach(on_meta(big_lm), "lm", plan=list(range(n)))
    assert worker._models["lm"].tables == []
    seen = table_spy(skel)
    with torch.no_grad():
        switch_held_back(worker, "lm")
        y = skel(ids.cuda())
        worker.synchronize()
    assert seen == [arena.base() + worker._models["lm"].offset + info.tensor("tok.weight").offset]
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4)
    worker.close()
    arena.close()


@gpu
def test_switch_to_a_given_region_plan_and_residency(store):
    """switch_to(region_offset=, plan=, resident=) as the daemon's worker
    uses it: the views move to the new region, the plan changes, and a
    resident switch copies nothing (zeroed weights stay zero until a real
    switch)."""
    torch.manual_seed(3)
    m = mlp()
    x = torch.randn(8, 32)
    with torch.no_grad():
        ref = m(x)
    info = register_module(store, "mlp", m, (x,), measure=False)
    arena = ps.Arena.create(0, 32 << 20, 4 << 20)
    r1, r2 = arena.alloc(info.bytes), arena.alloc(info.bytes)
    worker = Worker(0, arena=arena, store=store, bandwidth_gbps=10.0, group_transfer_overhead_ms=0.0)
    skel = worker.attach(on_meta(mlp), "mlp", r1, plan=[0])
    xc = x.cuda()
    with torch.no_grad():
        worker.switch_to("mlp", region_offset=r2, plan=[0, 1, 3])
        torch.testing.assert_close(skel(xc).cpu(), ref, rtol=1e-5, atol=1e-5)
        assert skel[0].weight.data_ptr() == arena.base() + r2 + info.tensor("0.weight").offset
        assert worker.switch.n_groups() == 3 and worker._models["mlp"].plan == [0, 1, 3]
        worker.synchronize()
        # Resident: no copy. Zero the region behind the worker's back: the
        # forward sees zero weights and biases, so it returns zeros.
        arena.write(r2, bytes(info.bytes))
        worker.switch_to("mlp", resident=True)
        assert worker.current == "mlp" and worker.switch.n_groups() == 1
        assert torch.count_nonzero(skel(xc)).item() == 0
        # A real switch copies again.
        worker.switch_to("mlp")
        torch.testing.assert_close(skel(xc).cpu(), ref, rtol=1e-5, atol=1e-5)
        # Resident at another region: the views move, nothing is copied there.
        worker.switch_to("mlp", region_offset=r1, resident=True)
        assert skel[0].weight.data_ptr() == arena.base() + r1 + info.tensor("0.weight").offset
        with pytest.raises(ValueError, match="outside"):
            worker.switch_to("mlp", region_offset=arena.size())
        assert skel[0].weight.data_ptr() == arena.base() + r1 + info.tensor("0.weight").offset
    worker.close()
    arena.close()


def two_models_in_one_region(store, seed, width=1024):
    """Models "A" and "B" (two MLPs of ``width``) registered and attached
    to one region of a new arena: A one group per layer, B one group.
    Returns their CPU outputs, the arena, the region, the worker, A's layer
    count, the two skeletons and the CUDA input."""
    torch.manual_seed(seed)
    ma, mb = mlp(width), mlp(width)
    x = torch.randn(64, 32)
    with torch.no_grad():
        ra, rb = ma(x), mb(x)
    register_module(store, "A", ma, (x,), measure=False)
    register_module(store, "B", mb, (x,), measure=False)
    nbytes = store.model_info("A").bytes
    arena = ps.Arena.create(0, nbytes + (8 << 20), 4 << 20)
    region = arena.alloc(nbytes)
    worker = Worker(0, arena=arena, store=store)
    n = len(store.model_info("A").layers)
    sa = worker.attach(on_meta(lambda: mlp(width)), "A", region, plan=list(range(n)))
    sb = worker.attach(on_meta(lambda: mlp(width)), "B", region, plan=[0])
    return ra, rb, arena, region, worker, n, sa, sb, x.cuda()


@gpu
def test_captured_graphs_wait_for_each_later_switch(store):
    """Worker.capture: the switched graph's group waits are external
    event-wait nodes, so a replay right after a later switch (copies held
    back on the GPU, the region overwritten by another model in between)
    still computes on the model's own bytes; the resident graph runs with
    no switch; a stale graph (plan changed) is refused."""
    ra, rb, arena, region, worker, n, sa, sb, xc = two_models_in_one_region(store, 11)
    with torch.no_grad():
        cap = worker.capture("A", (xc,))
        for _ in range(3):
            worker.switch_to("B")  # B's bytes in the shared region
            torch.testing.assert_close(sb(xc).cpu(), rb, rtol=1e-4, atol=1e-4)
            switch_held_back(worker, "A")  # A's copies start ~25 ms from now
            assert not worker.switch.group_ready(n - 1)
            y = cap(xc)
            assert cap.last_kind == "switched"
            torch.testing.assert_close(y.cpu(), ra, rtol=1e-4, atol=1e-4)
        worker.synchronize()
        y = cap(xc * 1.0)  # other input tensor, same shape: copied into the graph's input
        assert cap.last_kind == "resident"
        torch.testing.assert_close(y.cpu(), ra, rtol=1e-4, atol=1e-4)
        worker.switch_to("A", resident=True)
        torch.testing.assert_close(cap(xc).cpu(), ra, rtol=1e-4, atol=1e-4)
        assert cap.last_kind == "resident"
        with pytest.raises(ValueError, match="shape"):
            cap(torch.randn(8, 32, device="cuda"))
        worker.switch_to("B")
        with pytest.raises(RuntimeError, match="not loaded"):
            cap(xc)
        worker.set_plan("A", [0])
        worker.switch_to("A")
        with pytest.raises(RuntimeError, match="capture it again"):
            cap(xc)
        cap = worker.capture("A", (xc,))
        switch_held_back(worker, "A")
        torch.testing.assert_close(cap(xc).cpu(), ra, rtol=1e-4, atol=1e-4)
    worker.close()
    arena.close()


def lm_with_a_token_table(store, seed):
    """big_lm registered as "lm" (its token table stored last) and a worker
    on an arena with room for it. Returns the CPU output, the token ids,
    the model's info, its layer count, the arena and the worker."""
    torch.manual_seed(seed)
    ref_model = big_lm()
    ids = tiny_ids(vocab=32768)
    with torch.no_grad():
        ref = ref_model(ids)
    info = register_module(store, "lm", ref_model, (ids,), measure=False)
    arena = ps.Arena.create(0, info.bytes + (8 << 20), 4 << 20)
    return ref, ids, info, len(info.layers), arena, Worker(0, arena=arena, store=store)


@gpu
def test_captured_graph_reads_token_tables_from_the_host_while_in_flight(store):
    ref, ids, info, n, arena, worker = lm_with_a_token_table(store, 12)
    skel = worker.attach(on_meta(big_lm), "lm", plan=list(range(n)))
    x = ids.cuda()
    with torch.no_grad():
        cap = worker.capture("lm", (x,))
        switch_held_back(worker, "lm")
        y = cap(x).clone()
        assert cap.last_kind == "switched"
        worker.synchronize()
        y_ready = cap(x).clone()
        assert cap.last_kind == "resident"
    assert skel.tok.weight.data_ptr() == arena.base() + worker._models["lm"].offset + info.tensor("tok.weight").offset
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(y, y_ready)
    worker.close()
    arena.close()


@gpu
def test_layer_times_with_the_gpu_held_are_the_gpus(store):
    """hold_gpu: the per-layer events time the GPU's work alone: a host
    delay inside the forward (a sleep in a pre-hook) shows up in the eager
    times but not in the held ones."""
    from pipeswitch.torch import measure_layer_ms
    import time as _time

    torch.manual_seed(13)
    m = mlp(256).cuda()
    x = torch.randn(16, 32, device="cuda")
    h = m[2].register_forward_pre_hook(lambda mod, args: _time.sleep(0.02))
    names = ["0", "2", "4", "6"]
    try:
        eager = measure_layer_ms(m, names, (x,), runs=3)
        held = measure_layer_ms(m, names, (x,), runs=3, hold_gpu=True)
    finally:
        h.remove()
    # The 20 ms host sleep before layer "2" lands in layer "0"'s stretch.
    assert eager[0] > 15.0, eager
    assert sum(held) < 5.0, held


# ---------------------------------------------------------------------------
# The fused switch + forward graph (Worker.capture(fused=True))
# ---------------------------------------------------------------------------

def region_bytes(arena, offset, nbytes):
    """A uint8 CUDA tensor viewing ``nbytes`` of the arena at ``offset``."""
    from pipeswitch.torch import _CudaMemory

    t = torch.as_tensor(_CudaMemory(arena.base() + offset, nbytes), device="cuda:0")
    assert t.data_ptr() == arena.base() + offset
    return t


def assert_region_holds(store, name, region, plan):
    end = store.group_ranges(name, plan)[-1][1]
    want = torch.frombuffer(bytearray(store.read(name, 0, end)), dtype=torch.uint8)
    assert torch.equal(region[:end].cpu(), want)


@gpu
def test_fused_graph_switches_in_over_garbage(store):
    """One replay of the fused graph copies the model into its region and
    runs the forward: after the region was filled with garbage (late, on the
    stream, right before the replay: the copies must come after it), the
    output is the resident forward's, bit for bit, and the region holds the
    model again."""
    torch.manual_seed(21)
    width = 1024
    ma = mlp(width)
    x = torch.randn(64, 32)
    with torch.no_grad():
        ra = ma(x)
    info = register_module(store, "A", ma, (x,), measure=False)
    assert len(info.layers) == 4
    arena = ps.Arena.create(0, info.bytes + (8 << 20), 4 << 20)
    worker = Worker(0, arena=arena, store=store)
    plan = [0, 1, 3]
    worker.attach(on_meta(lambda: mlp(width)), "A", plan=plan)
    entry = worker._models["A"]
    region = region_bytes(arena, entry.offset, info.bytes)
    xc = x.cuda()
    with torch.no_grad():
        cap = worker.capture("A", (xc,), fused=True)
        assert cap.fused
        y_res = cap(xc).clone()
        assert cap.last_kind == "resident"
        torch.testing.assert_close(y_res.cpu(), ra, rtol=1e-4, atol=1e-4)
        for fill in (0x7F, 0xFF, 0x00):
            torch.cuda._sleep(20_000_000)
            region.fill_(fill)
            y = cap.switch_and_run(xc)
            assert cap.last_kind == "fused"
            assert worker.current == "A" and entry.resident and worker._current is None
            assert torch.equal(y, y_res), fill
            assert torch.equal(cap(xc), y_res) and cap.last_kind == "resident"
            worker.synchronize()  # the engine's resident start of A, after the graph's copies
            assert worker.switch.n_groups() == 1
            torch.cuda.synchronize()
            assert_region_holds(store, "A", region, plan)
        y = cap.switch_and_run(x.cuda() * 1.0)  # another input tensor of the same shape
        assert torch.equal(y, y_res)
        with pytest.raises(ValueError, match="shape"):
            cap.switch_and_run(torch.randn(8, 32, device="cuda"))
    worker.close()
    arena.close()


@gpu
def test_fused_graphs_alternate_two_models_in_one_region(store):
    """Two models share a region and switch in by fused replays with no
    host sync in between; a switch of the engine still in flight (held
    back on the GPU) completes before a fused replay's copies (rule 1); the
    other model is not resident afterwards; switch_to works as before."""
    ra, rb, arena, region, worker, n, sa, sb, xc = two_models_in_one_region(store, 22)
    with torch.no_grad():
        cap_a = worker.capture("A", (xc,), fused=True)
        cap_b = worker.capture("B", (xc,), fused=True)
        yb_res = cap_b(xc).clone()
        torch.testing.assert_close(yb_res.cpu(), rb, rtol=1e-4, atol=1e-4)
        ya_res = None
        for _ in range(3):
            ya = cap_a.switch_and_run(xc).clone()
            if ya_res is None:
                ya_res = cap_a(xc).clone()
                assert cap_a.last_kind == "resident"
            yb = cap_b.switch_and_run(xc).clone()
            assert worker.current == "B"
            assert not worker._models["A"].resident and worker._models["B"].resident
            assert torch.equal(ya, ya_res) and torch.equal(yb, yb_res)
        torch.testing.assert_close(ya_res.cpu(), ra, rtol=1e-4, atol=1e-4)
        with pytest.raises(RuntimeError, match="not loaded"):
            cap_a(xc)
        with pytest.raises(RuntimeError, match="not loaded"):
            sa(xc)
        for _ in range(2):
            switch_held_back(worker, "A")  # A's copies start ~25 ms from now
            assert not worker.switch.group_ready(n - 1)
            yb = cap_b.switch_and_run(xc)
            assert torch.equal(yb, yb_res)
            with pytest.raises(RuntimeError, match="not loaded"):
                sa(xc)
        worker.switch_to("A")  # the engine's path after a fused replay
        torch.testing.assert_close(sa(xc).cpu(), ra, rtol=1e-4, atol=1e-4)
        worker.synchronize()
        assert torch.equal(cap_a.switch_and_run(xc), ya_res)
        assert torch.equal(cap_b.switch_and_run(xc), yb_res)
        # Resident after a fused replay: the eager module runs from the region, in the stream's order.
        torch.testing.assert_close(sb(xc).cpu(), rb, rtol=1e-4, atol=1e-4)
    worker.close()
    arena.close()


@gpu
def test_fused_graph_refuses_stale_bindings_and_readded_models(store):
    torch.manual_seed(23)
    width = 256
    ma = mlp(width)
    x = torch.randn(8, 32)
    with torch.no_grad():
        ra = ma(x)
    register_module(store, "A", ma, (x,), measure=False)
    info = store.model_info("A")
    arena = ps.Arena.create(0, info.bytes + (8 << 20), 4 << 20)
    worker = Worker(0, arena=arena, store=store)
    worker.attach(on_meta(lambda: mlp(width)), "A", plan=[0, 2])
    xc = x.cuda()
    with torch.no_grad():
        plain = worker.capture("A", (xc,))
        assert not plain.fused
        with pytest.raises(RuntimeError, match="fused=True"):
            plain.switch_and_run(xc)
        cap = worker.capture("A", (xc,), fused=True)
        torch.testing.assert_close(cap.switch_and_run(xc).cpu(), ra, rtol=1e-4, atol=1e-4)
        worker.set_plan("A", [0])
        with pytest.raises(RuntimeError, match="capture it again"):
            cap.switch_and_run(xc)
        cap = worker.capture("A", (xc,), fused=True)
        torch.testing.assert_close(cap.switch_and_run(xc).cpu(), ra, rtol=1e-4, atol=1e-4)
        # The store's model removed and added again (other bytes): refused.
        torch.cuda.synchronize()
        store.remove_model("A")
        with pytest.raises(ps.NotFound):
            cap.switch_and_run(xc)
        register_module(store, "A", mlp(width), (x,), measure=False)
        with pytest.raises(RuntimeError, match="added again"):
            cap.switch_and_run(xc)
    worker.close()
    arena.close()


@gpu
def test_fused_graph_reads_token_tables_from_the_host(store):
    ref, ids, info, n, arena, worker = lm_with_a_token_table(store, 24)
    plan = list(range(n))
    skel = worker.attach(on_meta(big_lm), "lm", plan=plan)
    entry = worker._models["lm"]
    assert entry.tables == [n - 1]
    region = region_bytes(arena, entry.offset, info.bytes)
    x = ids.cuda()
    with torch.no_grad():
        cap = worker.capture("lm", (x,), fused=True)
        y_res = cap(x).clone()
        torch.testing.assert_close(y_res.cpu(), ref, rtol=1e-4, atol=1e-4)
        torch.cuda._sleep(20_000_000)
        region.fill_(0xFF)
        y = cap.switch_and_run(x)
        assert torch.equal(y, y_res)
        torch.cuda.synchronize()
        assert_region_holds(store, "lm", region, plan)
    tok = info.tensor("tok.weight")
    assert skel.tok.weight.data_ptr() == arena.base() + entry.offset + tok.offset
    worker.close()
    arena.close()


@gpu
def test_fused_replay_is_not_slower_than_switch_to_and_a_replay(store):
    """Host wall time from the call to synchronize, medians of interleaved
    runs (both copy the whole model every time); written to
    $PIPESWITCH_FUSED_TIMING (JSON) when set."""
    import json
    import statistics
    import time as _time

    torch.manual_seed(25)
    width = 2048
    ma = mlp(width)
    x = torch.randn(64, 32)
    info = register_module(store, "A", ma, (x,), measure=False)
    arena = ps.Arena.create(0, info.bytes + (8 << 20), 4 << 20)
    worker = Worker(0, arena=arena, store=store)
    n = len(info.layers)
    worker.attach(on_meta(lambda: mlp(width)), "A", plan=list(range(n)))
    xc = x.cuda()

    def two_calls():
        torch.cuda.synchronize()
        t0 = _time.perf_counter()
        worker.switch_to("A")
        cap(xc)
        torch.cuda.synchronize()
        ms = (_time.perf_counter() - t0) * 1e3
        worker.synchronize()
        return ms

    def fused():
        torch.cuda.synchronize()
        t0 = _time.perf_counter()
        cap.switch_and_run(xc)
        torch.cuda.synchronize()
        return (_time.perf_counter() - t0) * 1e3

    with torch.no_grad():
        cap = worker.capture("A", (xc,), fused=True)
        for _ in range(3):
            two_calls(), fused()
        a, b = [], []
        for _ in range(40):
            a.append(two_calls())
            b.append(fused())
    old, new = statistics.median(a), statistics.median(b)
    result = {"model_bytes": info.bytes, "groups": n, "runs": len(a), "switch_to_and_replay_ms": old,
              "fused_replay_ms": new, "switch_to_and_replay_p10_p90_ms": [sorted(a)[4], sorted(a)[35]],
              "fused_replay_p10_p90_ms": [sorted(b)[4], sorted(b)[35]], "device": torch.cuda.get_device_name(0)}
    print("fused timing:", json.dumps(result))
    path = os.environ.get("PIPESWITCH_FUSED_TIMING")
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    assert new <= old * 1.02, result
    worker.close()
    arena.close()
