"""Tests for parallel.py's ZeRO stages, with two gloo processes on this CPU (torch.multiprocessing): ZeRO
stages 1, 2 and 3 against one process on the whole batch (with and without gradient
accumulation), stage 3 on MoE layers, on rows that do not split evenly, and against torch's
FSDP2, a forward under no_grad between a forward and its backward (KTO's), the bytes each rank
holds, and the errors users hit first.

Starting processes (and their gloo rendezvous) costs more than the cases themselves: so one
spawn runs every family of cases (training, memory, no_grad) and the tests read its results
from module-scoped fixtures."""

import contextlib
import math

import pytest
import torch
import torch.distributed as dist

from conftest import spawn
from model import Model, ModelConfig
from parallel import ZeRO, clip_grad_norm_, zero_full

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny models (conftest.py)

SMALL = dict(vocab_size=256, n_layer=2, dim=32, n_head=4, n_kv_head=2, mlp_dim=64, max_seq_len=64)
# gate/up projections of 67 rows do not split evenly over 2 ranks: the shards carry a padding row
ODD = dict(SMALL, mlp_dim=67)
# MoE layers: their router z-loss leaves each block by a side path (an attribute that the head
# adds to the loss), not through the block's output, where stage 3 hooks its backward gather
MOE = dict(SMALL, n_experts=4, top_k=2, d_expert=32, router_z_loss=0.01)
MEM = dict(ODD, n_layer=4)      # the memory test's model
OTHERS = {"moe": MOE, "odd": ODD}      # trained at stage 3 only
STAGES = (1, 2, 3)


def _join(rank, store):
    torch.set_num_threads(1)     # two processes on two cores: more threads only fight over them
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)


def _batches(steps, accum, rows=4, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 256, (rows, T + 1), generator=g) for _ in range(accum)] for _ in range(steps)]


def _adamw(params):
    # Adam moves a weight by about lr * g / (|g| + eps): where the gradient is near zero, a
    # rounding difference dg between two summation orders (one process vs two ranks) moves the
    # weight by up to lr * dg / eps. PyTorch's eps=1e-8 turns float32 noise of 1e-9 into 1e-3 of
    # a step; 1e-6 keeps it under the tests' 1e-5 while a wrong gradient still shows in full.
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, eps=1e-6)


def _train(model, batches, rank=0, world=1, net=None, clip=torch.nn.utils.clip_grad_norm_, opt=None):
    """Clipped AdamW steps; each micro-batch's rows split over the ranks; with a ZeRO wrapper,
    every micro-batch but the last runs under no_sync. Returns this rank's losses and the
    optimizer."""
    net = net or model
    opt = opt or _adamw(model.parameters())
    losses = []
    for micro in batches:
        for i, x in enumerate(micro):
            x = x.chunk(world)[rank]
            quiet = isinstance(net, ZeRO) and i < len(micro) - 1
            with net.no_sync() if quiet else contextlib.nullcontext():
                _, loss, _ = net(x[:, :-1], labels=x[:, 1:])
                (loss / len(micro)).backward()
            losses.append(loss.item())
        clip(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, opt


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _full(net):
    """A ZeRO model's whole weights, as one process's state_dict() holds them: each shard's
    rows all-gathered from every rank (so every rank must call it), buffers as they are."""
    by_shard = {id(p.shard): p for p in net.params}
    return {k: zero_full(v, by_shard[id(v)].rows) if id(v) in by_shard else v.detach().clone()
            for k, v in net.module.state_dict(keep_vars=True).items()}


def _fresh(config, rank, state):
    torch.manual_seed(rank)                 # different inits on each rank: the broadcast must fix them
    model = Model(ModelConfig(**config))
    if rank == 0:
        model.load_state_dict(state)
    return model


def _close(got, want, what):
    # atol 1e-5 is 1e-3 of one lr=1e-2 step (rounding, see _adamw); a missing, doubled or
    # misplaced gradient is off by a whole step.
    assert got.keys() >= want.keys(), f"{what}: missing {sorted(want.keys() - got.keys())}"
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda s: f"{what} {k}: {s}")


# -----------------------------------------------------------------------------
# Stages 1, 2, 3 == one process; stage 3 == FSDP2

def _train_cases(rank, state, other_states, batches):
    results = {}
    for stage in STAGES:
        for accum, b in batches.items():
            model = _fresh(SMALL, rank, state)
            net = ZeRO(model, stage=stage)
            losses, _ = _train(model, b, rank, 2, net, clip=clip_grad_norm_)
            results[stage, accum] = {"losses": losses, "weights": _full(net)}
    for name, config in OTHERS.items():
        model = _fresh(config, rank, other_states[name])
        net = ZeRO(model, stage=3)
        losses, _ = _train(model, batches[1], rank, 2, net, clip=clip_grad_norm_)
        results[name] = {"losses": losses, "weights": _full(net)}
    from torch.distributed.fsdp import fully_shard
    model = Model(ModelConfig(**SMALL))
    model.load_state_dict(state)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    losses, _ = _train(model, batches[1], rank, 2)
    results["fsdp2"] = {"losses": losses, "weights": {k: v.full_tensor() for k, v in model.state_dict().items()}}
    return results


def _worker(rank, store, inputs, out):
    """Every case, one family after the other, in one pair of processes (each on fresh models)."""
    _join(rank, store)
    results = {"train": _train_cases(rank, inputs["state"], inputs["other_states"], inputs["batches"]),
               "memory": _memory_cases(rank, inputs["mem_state"], inputs["mem_batches"]),
               "no_grad": _no_grad_between_case(rank, inputs["state"], inputs["batches"][2][0])}
    torch.save(results, f"{out}.{rank}")
    # both ranks done before either tears down: a rank that exits while the other's last gloo
    # exchange is in flight can abort it ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def inputs():
    """The initial weights of each model (seeded) and the training batches."""
    def init(config):
        torch.manual_seed(0)
        return _weights(Model(ModelConfig(**config)))
    return dict(state=init(SMALL), other_states={k: init(c) for k, c in OTHERS.items()}, mem_state=init(MEM),
                batches={1: _batches(3, 1), 2: _batches(3, 2, seed=1)}, mem_batches=_batches(1, 1))


@pytest.fixture(scope="module")
def ranks(inputs, tmp_path_factory):
    """Both ranks' results: one spawn for every test (starting the processes is what costs)."""
    tmp = tmp_path_factory.mktemp("zero")
    spawn(_worker, args=(str(tmp / "store"), inputs, str(tmp / "out")), nprocs=2)
    return [torch.load(tmp / f"out.{r}") for r in range(2)]


@pytest.fixture(scope="module")
def trained(inputs, ranks):
    """One process on the whole batch, and the 2-rank runs, for 3 steps of 1 and of 2 micro-batches
    (and of 1 for the OTHERS)."""
    state, batches = inputs["state"], inputs["batches"]
    want = {}
    for accum, b in batches.items():
        model = Model(ModelConfig(**SMALL))
        model.load_state_dict(state)
        losses, _ = _train(model, b)
        want[accum] = {"losses": losses, "weights": _weights(model)}
    for name, config in OTHERS.items():
        model = Model(ModelConfig(**config))
        model.load_state_dict(inputs["other_states"][name])
        losses, _ = _train(model, batches[1])
        want[name] = {"losses": losses, "weights": _weights(model)}
    return want, [r["train"] for r in ranks]


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("stage", STAGES)
def test_zero_equals_one_process(trained, stage, accum):
    """Two ranks on half of each micro-batch, 3 clipped AdamW steps (with 2 micro-batches: no_sync
    on the first): the global losses and the final weights of one process on the whole batch,
    on both ranks."""
    want, got = trained
    want = want[accum]
    # each rank's loss is the mean over its half: the global mean is their average
    global_losses = [(a + b) / 2 for a, b in zip(got[0][stage, accum]["losses"], got[1][stage, accum]["losses"])]
    torch.testing.assert_close(torch.tensor(global_losses), torch.tensor(want["losses"]), rtol=1e-5, atol=1e-5)
    for rank in range(2):
        _close(got[rank][stage, accum]["weights"], want["weights"], f"stage {stage} rank {rank}")


@pytest.mark.parametrize("name", OTHERS)
def test_stage3_with_moe_layers_and_padded_rows_equals_one_process(trained, name):
    """MoE blocks (router, experts, router z-loss) sharded as units; parameters whose rows do
    not split evenly over the ranks (a padding row in the shards): the same weights."""
    want, got = trained
    global_losses = [(a + b) / 2 for a, b in zip(got[0][name]["losses"], got[1][name]["losses"])]
    torch.testing.assert_close(torch.tensor(global_losses), torch.tensor(want[name]["losses"]), rtol=1e-5, atol=1e-5)
    for rank in range(2):
        _close(got[rank][name]["weights"], want[name]["weights"], f"{name} rank {rank}")


def test_stage3_equals_torch_fsdp2(trained):
    """Same layout, same units (one per block, the root): FSDP2 and our stage 3 end with the same
    weights and losses."""
    _, got = trained
    for rank in range(2):
        assert got[rank]["fsdp2"]["losses"] == pytest.approx(got[rank][3, 1]["losses"], rel=1e-5, abs=1e-6)
        _close(got[rank][3, 1]["weights"], got[rank]["fsdp2"]["weights"], f"ours vs FSDP2, rank {rank}")


# -----------------------------------------------------------------------------
# A forward under no_grad between a forward and its backward (KTO: the mismatched rows' KL
# baseline), which must not take away what that backward needs

def _no_grad_between(net, x, y, rank=0, world=1):
    """Sequence log-probs of this rank's rows of x with gradients, the mean log-prob of all of y
    without (the same constant on every rank, as KTO's all-reduced KL), then the backward of
    their product: linear in the first forward, so the ranks' average gradient is one process's."""
    x = x.chunk(world)[rank]
    lp = net(x[:, :-1], labels=x[:, 1:], log_probs=True)[2]["log_probs"]
    with torch.no_grad():
        kl = net(y[:, :-1], labels=y[:, 1:], log_probs=True)[2]["log_probs"].mean()
    (lp.mean() * kl).backward()


def _no_grad_between_case(rank, state, micro):
    model = _fresh(SMALL, rank, state)
    net = ZeRO(model, stage=3)
    try:
        _no_grad_between(net, *micro)   # (4, T + 1) rows split over the ranks; (4, T + 1) whole
    except RuntimeError as e:
        return {"error": str(e)}
    grads = {n: zero_full(p.shard.grad, p.rows) for p in net.params for n in p.names}
    return {"error": None, "grads": grads, "gathered": net.memory()["gathered"]}


def test_stage3_no_grad_forward_before_backward_equals_one_process(inputs, ranks):
    """The no_grad forward frees the root (embedding, head) at its end; the pending backward
    gathers it again and ends with one process's gradients (it used to run on freed storage)."""
    model = Model(ModelConfig(**SMALL))
    model.load_state_dict(inputs["state"])
    x, y = inputs["batches"][2][0]
    _no_grad_between(model, x, y)
    want = {n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}
    for rank in range(2):
        got = ranks[rank]["no_grad"]
        assert got["error"] is None, f"rank {rank}: {got['error']}"
        _close(got["grads"], want, f"gradients, rank {rank}")
        assert got["gathered"] == 0        # the backward's end frees the root as usual


# -----------------------------------------------------------------------------
# Memory

def _memory_cases(rank, state, batches):
    results = {}
    for stage in STAGES:
        model = _fresh(MEM, rank, state)
        net = ZeRO(model, stage=stage)
        between, seen = [], {}
        # registered after ZeRO's own hook, so it runs once layers.0 has been freed again
        model.layers[0].register_forward_hook(lambda *_: between.append(net.memory()["gathered"]))
        opt = _adamw(model.parameters())
        opt.register_step_pre_hook(lambda *_: seen.update(grads=net.memory()["grads"]))
        opt.register_step_post_hook(lambda *_: seen.update(net.memory(opt)))
        _train(model, batches, rank, 2, net, clip=clip_grad_norm_, opt=opt)
        # evaluation (no backward to come): stage 3 frees the root as soon as the forward ends
        x = batches[0][0]
        with torch.no_grad():
            _, loss, _ = net(x[:, :-1], labels=x[:, 1:])
        after_eval = net.memory()["gathered"]
        # every full weight at once, for code that does not go through forward()
        with net.summon_full_params():
            h = model.hidden_states(x[:, :-1])
            summoned = net.memory()["gathered"]
        results[stage] = dict(seen, between=between, after_eval=after_eval, summoned=summoned,
                              loss=loss.item(), h=h, after_summon=net.memory()["gathered"])
    # an optimizer built before wrapping holds the old parameters, which no longer train
    model = Model(ModelConfig(**SMALL))
    early = torch.optim.AdamW(model.parameters())
    net = ZeRO(model, stage=2)
    try:
        net.memory(early)
    except ValueError as e:
        results["early_optimizer"] = str(e)
    return results


def test_memory_per_rank_shrinks_as_claimed(ranks):
    model = Model(ModelConfig(**MEM))                      # the sizes: MEM's shapes, whatever the values
    nbytes = lambda ps: sum(p.numel() * 4 for p in ps)                     # noqa: E731
    shard_bytes = lambda ps: sum(math.ceil(p.shape[0] / 2) * p[0].numel() * 4 for p in ps)  # noqa: E731
    params = list(model.parameters())                      # each tensor once: the tied head is the embedding
    P = nbytes(params)
    root = P - sum(nbytes(b.parameters()) for b in model.layers)
    layer = nbytes(model.layers[0].parameters())
    steps = 4 * len(params)                                # AdamW's step counter: one float32 per parameter
    for rank in range(2):
        m = ranks[rank]["memory"]
        for stage in STAGES:
            got, want = m[stage], m[stage]["expected"]
            assert want["params"] == P / (2 if stage == 3 else 1)
            assert want["optimizer"] == 2 * P / 2 + steps / 2
            # what is allocated: the full weights plus padding (stages 1, 2), or a shard (stage 3),
            # padded to 2 rows per pair; Adam's two moments of the shard, and the step counters
            if stage < 3:
                assert P <= got["params"] == got["gathered"] <= P + 4 * len(params) * MEM["dim"]
            else:
                assert got["params"] == shard_bytes(params) and P / 2 < got["params"] < 1.01 * P / 2
                assert got["gathered"] == 0                # after the backward, nothing full is left
            assert got["optimizer"] == 2 * shard_bytes(params) + steps
            assert got["optimizer"] <= 1.01 * want["optimizer"]
            assert got["grads"] == shard_bytes(params)     # after the reduction, every stage keeps G/W
            assert got["after_eval"] == got["after_summon"] == (0 if stage == 3 else got["gathered"])
            assert got["summoned"] >= P
            assert got["loss"] == pytest.approx(m[1]["loss"], rel=1e-6)
            torch.testing.assert_close(got["h"], m[1]["h"])
        # the peak of the gradients: stage 1 holds all of them at once (G), stages 2 and 3 the
        # shards' (G/W) and at most the root's and one block's full gradients on top
        assert m[1]["peak_grads"] >= P
        for stage in (2, 3):
            assert m[stage]["peak_grads"] <= shard_bytes(params) + root + layer < P
        # stage 3: between two blocks only the root (embedding, final norm) is gathered, in
        # training and in evaluation (then under summon_full_params, everything is); the most
        # ever gathered at once is the root and one block, far from the whole model
        assert m[3]["between"] == [root, root, P]
        assert m[3]["peak_gathered"] == root + layer < P / 2
        assert m[1]["peak_gathered"] >= P and m[1]["between"] == [m[1]["gathered"]] * 3


# -----------------------------------------------------------------------------
# Errors

def test_optimizer_built_before_wrapping_is_a_clear_error(ranks):
    for rank in range(2):
        assert "build the optimizer after wrapping" in ranks[rank]["memory"].get("early_optimizer", "no error")

def test_bad_stage_units_and_missing_process_group_are_clear_errors():
    model = Model(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match=r"stage must be 1 \(optimizer state\), 2 .* or 3"):
        ZeRO(model, stage=0)
    with pytest.raises(ValueError, match="units must be submodules"):
        ZeRO(model, units=[torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="units must not nest"):
        ZeRO(model, units=[model.layers[0], model.layers[0].mlp])
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ZeRO(model, stage=3)


def test_clip_grad_norm_without_process_group_matches_torch():
    """With one process (no group) it is torch's clip_grad_norm_: same norm, same clipped grads."""
    ours = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    theirs = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    for p, q, g in zip(ours, theirs, (3.0, 4.0)):
        p.grad, q.grad = torch.full_like(p, g), torch.full_like(q, g)
    torch.testing.assert_close(clip_grad_norm_(ours, 1.0), torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad)
