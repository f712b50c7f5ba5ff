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
from pipeswitch.torch import ROOT_LAYER, Worker, execution_order, register_module  # noqa: E402

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
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 6)
        self.block = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 10, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.proj = nn.Linear(6, 6)
        self.proj2 = nn.Linear(6, 6)
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
