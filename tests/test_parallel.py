"""Tests for parallel.py, with two gloo processes on this CPU (torch.multiprocessing): data
parallelism against one process on the whole batch and against torch's DistributedDataParallel,
gradient accumulation with no_sync, a parameter that gets no gradient; the bandwidth table and
the health check's slow rank; torch's FSDP2 and DTensor TP, and our TP inside ZeRO, against
one process.

Starting processes (and their gloo rendezvous) costs more than the cases themselves, even
forked from a server that has imported torch (conftest.spawn): so one spawn of 2 ranks runs
every 2-rank case and one spawn of 4 ranks every 4-rank case, and the tests read their results
from module-scoped fixtures."""

import pytest
import torch
import torch.distributed as dist

from conftest import spawn
import parallel
from model import Model, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models (conftest.py)

SMALL = dict(vocab_size=256, n_layer=2, dim=32, n_head=4, n_kv_head=2, mlp_dim=64, max_seq_len=64)


def _join(rank, store, world=2):
    torch.set_num_threads(1)     # the ranks share this machine's 2 cores: more threads only fight over them
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _leave():
    # every rank done before any tears down: a rank that exits while another's last gloo
    # exchange is in flight can abort it ("terminate called without an active exception",
    # seen once in CI)
    dist.barrier()
    dist.destroy_process_group()


def _batches(steps, accum, rows=4, T=16):
    g = torch.Generator().manual_seed(0)
    return [[torch.randint(0, 256, (rows, T + 1), generator=g) for _ in range(accum)] for _ in range(steps)]


def _train(model, batches, rank=0, world=1, wrapper=None):
    """AdamW steps; each step's micro-batches split by rows over the ranks. Returns the losses
    (this rank's) and the final weights."""
    net = wrapper(model) if wrapper else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for micro in batches:
        for i, x in enumerate(micro):
            x = x.chunk(world)[rank]
            last = i == len(micro) - 1
            with net.no_sync() if wrapper and not last else torch.enable_grad():
                _, loss, _ = net(x[:, :-1], labels=x[:, 1:])
                (loss / len(micro)).backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _dp(rank, state, batches, impl):
    torch.manual_seed(rank)                 # different inits: the broadcast must fix them
    model = Model(ModelConfig(**SMALL))
    if impl == "torch":
        model.load_state_dict(state)        # DDP also broadcasts, but start it from the same place
        wrapper = torch.nn.parallel.DistributedDataParallel
    else:
        wrapper = lambda m: parallel.DataParallel(m, bucket_mb=0.01)   # noqa: E731 (many small buckets)
        if rank == 0:
            model.load_state_dict(state)
    losses, weights = _train(model, batches, rank, 2, wrapper)
    return {"losses": losses, "weights": weights}


class _TwoBranches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x, use_b):
        return self.b(x) if use_b else self.a(x)


def _unused(rank):
    torch.manual_seed(0)
    net = parallel.DataParallel(_TwoBranches())
    x = torch.full((2, 4), float(rank + 1))
    net(x, use_b=rank == 1).sum().backward()       # rank 0 never touches b, rank 1 never a
    return {k: p.grad for k, p in net.module.named_parameters()}


def _net(rank):
    rows = parallel.bandwidth_table(sizes=[4096, 2 ** 20], iters=2)
    # rank 1 multiplies matrices of 512 times the work; which rank the check names is still a
    # timing on a shared 2-core machine (CI once saw none), so the test asserts what is exact:
    # every rank gets the same table and the verdict follows from it (slow_ranks itself is
    # tested on fixed numbers in test_train.py)
    mm, ar, slow = parallel.health_check(matmul=128 if rank == 0 else 1024, allreduce_mb=1, iters=3)
    return {"rows": rows, "slow": slow, "mm": mm, "ar": ar}


DP_CASES = [(impl, accum) for impl in ("ours", "torch") for accum in (1, 2)]


def _two_rank_worker(rank, store, inputs, out):
    """Every 2-rank case, one after the other in one pair of processes (each on fresh models)."""
    _join(rank, store)
    results = {("dp", impl, accum): _dp(rank, inputs["state"], inputs["dp_batches"][accum], impl)
               for impl, accum in DP_CASES}
    results["unused"] = _unused(rank)
    results["net"] = _net(rank)
    results["torch", 1] = _torch(inputs["state"], inputs["mesh_batches"], tp=1)
    torch.save(results, f"{out}.{rank}")
    _leave()


def _four_rank_worker(rank, store, inputs, out):
    """Every 4-rank case: torch's FSDP2 x DTensor TP, and our TP inside ZeRO stages 1 and 3."""
    _join(rank, store, world=4)
    results = {("torch", 2): _torch(inputs["state"], inputs["mesh_batches"], tp=2)}
    for stage in (1, 3):
        results["scratch", stage] = _scratch(inputs["scratch_state"], inputs["mesh_batches"], stage)
    torch.save(results, f"{out}.{rank}")
    _leave()


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# the scratch mesh's model: one K/V head for two TP ranks and QK-norm, both of which need TP's
# gradient sum, which must survive ZeRO swapping in its own copies of the weights
SCRATCH = dict(SMALL, n_kv_head=1, qk_norm=True)


@pytest.fixture(scope="module")
def inputs():
    """What every rank starts from: the initial weights and the batches of each case."""
    torch.manual_seed(0)
    state = _weights(Model(ModelConfig(**SMALL)))
    torch.manual_seed(0)
    scratch_state = _weights(Model(ModelConfig(**SCRATCH)))
    return dict(state=state, scratch_state=scratch_state, dp_batches={accum: _batches(3, accum) for accum in (1, 2)},
                mesh_batches=_batches(2, 2))


def _spawn(worker, world, tmp, inputs):
    spawn(worker, args=(str(tmp / "store"), inputs, str(tmp / "out")), nprocs=world)
    return [torch.load(tmp / f"out.{rank}") for rank in range(world)]


@pytest.fixture(scope="module")
def two_ranks(inputs, tmp_path_factory):
    return _spawn(_two_rank_worker, 2, tmp_path_factory.mktemp("two_ranks"), inputs)


@pytest.fixture(scope="module")
def four_ranks(inputs, tmp_path_factory):
    return _spawn(_four_rank_worker, 4, tmp_path_factory.mktemp("four_ranks"), inputs)


@pytest.mark.parametrize("impl", ["ours", "torch"])
@pytest.mark.parametrize("accum", [1, 2])
def test_data_parallel_equals_one_process(impl, accum, inputs, two_ranks):
    """Two ranks on half a batch each, for 3 AdamW steps (with 2 micro-batches: no_sync on the
    first), end with the weights of one process on the whole batch, on both ranks."""
    model = Model(ModelConfig(**SMALL))
    model.load_state_dict(inputs["state"])
    _, want = _train(model, inputs["dp_batches"][accum])
    # Averaging two half-batch means sums in another order than one whole-batch mean, and Adam
    # divides by sqrt(v): a near-zero gradient's rounding can move its weight by a visible
    # fraction of lr (1e-2). atol 1e-5 is 1e-3 of one step; a missing or doubled gradient would
    # be off by a whole step.
    for rank in range(2):
        got = two_ranks[rank]["dp", impl, accum]["weights"]
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda s: f"rank {rank} {k}: {s}")


def test_a_parameter_without_gradient_on_one_rank_counts_as_zeros(two_ranks):
    g0, g1 = (r["unused"] for r in two_ranks)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k])
    # a's gradient came from rank 0 alone (inputs of 1), b's from rank 1 (inputs of 2), halved
    torch.testing.assert_close(g0["a.weight"], torch.full((4, 4), 2.0 / 2))
    torch.testing.assert_close(g0["b.weight"], torch.full((4, 4), 4.0 / 2))
    torch.testing.assert_close(g0["a.bias"], torch.full((4,), 2.0 / 2))


def test_bandwidth_table_and_health_check(two_ranks, capsys):
    r0, r1 = (r["net"] for r in two_ranks)
    assert r0["rows"] == r1["rows"]                       # one table: every rank agrees
    ops = [row[0] for row in r0["rows"]]
    assert ops == [op for op in parallel.BUS_FACTOR for _ in range(2)]
    for op, n_bytes, sec, alg, bus in r0["rows"]:
        assert sec > 0 and alg == pytest.approx(n_bytes / sec) and bus == pytest.approx(alg * parallel.BUS_FACTOR[op](2))
    assert r0["mm"] == r1["mm"] and r0["ar"] == r1["ar"] and len(r0["mm"]) == 2
    assert all(t > 0 for t in r0["mm"] + r0["ar"])
    assert r0["slow"] == r1["slow"] == parallel.slow_ranks(r0["mm"])
    parallel.print_bandwidth(r0["rows"], 2, "gloo")
    assert "| all_reduce | 4 KiB |" in capsys.readouterr().out


def test_parallel_commands_need_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr("sys.argv", ["parallel.py", "bench"])
    with pytest.raises(SystemExit, match="torchrun --nproc_per_node=2 parallel.py bench"):
        parallel._main()


# -----------------------------------------------------------------------------
# The torch-native path: FSDP2 and DTensor tensor parallelism on the same layout

def _mesh_train(model, batches, mesh=None, clip=1.0):
    """AdamW steps with gradient clipping; each micro-batch's rows split over the mesh's
    data-parallel ranks (the TP ranks of one DP rank read the same rows)."""
    dp, dp_rank = (mesh["dp"].size(), mesh["dp"].get_local_rank()) if mesh is not None else (1, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for micro in batches:
        for x in micro:
            x = x.chunk(dp)[dp_rank]
            _, loss, _ = model(x[:, :-1], labels=x[:, 1:])
            (loss / len(micro)).backward()
            losses.append(loss.item())
        norm = parallel.grad_norm(model.parameters())
        for p in model.parameters():
            p.grad.mul_(min(1.0, clip / (norm.item() + 1e-6)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, norm.item()


def _full_weights(model):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def _torch(state, batches, tp):
    model = Model(ModelConfig(**SMALL))
    model.load_state_dict(state)
    mesh = parallel.make_mesh(tp=tp)
    parallel.torch_parallelize(model, mesh)
    losses, norm = _mesh_train(model, batches, mesh)
    return {"losses": losses, "norm": norm, "weights": _full_weights(model)}


@pytest.mark.parametrize("world,tp", [(2, 1), (4, 2)])
def test_torch_fsdp2_and_tensor_parallel_equal_one_process(world, tp, inputs, request):
    """FSDP2 over 2 ranks, and FSDP2 x DTensor TP on a 2 x 2 mesh, give one process's weights
    after 2 clipped AdamW steps of 2 micro-batches."""
    ranks = request.getfixturevalue("two_ranks" if world == 2 else "four_ranks")
    model = Model(ModelConfig(**SMALL))
    model.load_state_dict(inputs["state"])
    _, want_norm = _mesh_train(model, inputs["mesh_batches"])
    want = _full_weights(model)
    assert len(ranks) == world
    for rank in range(world):
        got = ranks[rank]["torch", tp]
        assert got["norm"] == pytest.approx(want_norm, rel=1e-5)
        for k in want:
            torch.testing.assert_close(got["weights"][k], want[k], rtol=1e-5, atol=1e-5,
                                       msg=lambda s: f"rank {rank} {k}: {s}")


# -----------------------------------------------------------------------------
# The scratch mesh: tensor parallelism inside ZeRO on 2 x 2 processes

def _scratch(state, batches, stage):
    model = Model(ModelConfig(**SCRATCH))
    model.load_state_dict(state)
    mesh = parallel.make_mesh(tp=2)
    tp, dp = mesh["tp"].get_group(), mesh["dp"].get_group()
    parallel.tensor_parallel(model, tp)
    before = dict(model.named_parameters(remove_duplicate=False))   # TP's pieces, before ZeRO's rows
    net = parallel.ZeRO(model, stage=stage, group=dp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for micro in batches:
        for x in micro:
            x = x.chunk(2)[mesh["dp"].get_local_rank()]
            _, loss, _ = net(x[:, :-1], labels=x[:, 1:])
            (loss / len(micro)).backward()
        params = [p for p in model.parameters()]
        # a piece TP replicates is held alike by tp // tp_slots ranks
        copies = [mesh["tp"].size() // getattr(p, "tp_slots", 1) for p in params]
        norm = parallel.clip_grad_norm_(params, 1.0, None, copies)
        opt.step()
        opt.zero_grad(set_to_none=True)
    weights = {n: parallel.tp_full(parallel.zero_full(p.detach(), before[n].shape[0], dp), before[n], tp)
               for n, p in model.named_parameters()}
    return {"norm": norm.item(), "weights": weights}


@pytest.mark.parametrize("stage", [1, 3])
def test_scratch_tensor_parallel_inside_zero_equals_one_process(stage, inputs, four_ranks):
    """TP over pairs of ranks, ZeRO over the pairs: 2 clipped AdamW steps equal one process's.
    One K/V head for two TP ranks and QK-norm (SCRATCH): both need TP's gradient sum, which must
    survive ZeRO swapping in its own copies of the weights."""
    model = Model(ModelConfig(**SCRATCH))
    model.load_state_dict(inputs["scratch_state"])
    _, want_norm = _mesh_train(model, inputs["mesh_batches"])
    want = dict(model.named_parameters())
    for rank in range(4):
        got = four_ranks[rank]["scratch", stage]
        assert got["norm"] == pytest.approx(want_norm, rel=1e-5)
        for k in want:
            torch.testing.assert_close(got["weights"][k], want[k].detach(), rtol=1e-5, atol=1e-5,
                                       msg=lambda s: f"rank {rank} {k}: {s}")
