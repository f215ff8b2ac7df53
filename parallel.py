"""
parallel.py: training on many GPUs, written from the collectives up.

The concept. One GPU runs out of either time or memory; parallelism spends more GPUs on one of
the two. Every strategy is a way of splitting something and a collective that puts it back:
- Data parallelism (DP): every rank holds the whole model and its own slice of the batch; the
  gradients are averaged with an all-reduce before each optimizer step. Done well, that
  all-reduce happens in buckets *during* the backward pass, so the network works while the
  GPU computes the earlier layers' gradients.
- ZeRO / FSDP: DP keeps W copies of the weights, the gradients and the optimizer state. Shard
  them instead: stage 1 shards the optimizer state, stage 2 the gradients too (reduce-scatter
  instead of all-reduce), stage 3 the weights (all-gathered around each block's use).
- Tensor and pipeline parallelism split each matmul, or the stack of layers.
The playbook's "scaling isn't just adding GPUs": every collective costs bandwidth, and the
bandwidth you actually get (NVLink, InfiniBand, PCIe) decides which strategy pays. Measure it
(`python parallel.py bench`), and watch for the slow rank: one throttled GPU slows every
collective, so the whole cluster runs at its speed.

Status: data parallelism with bucketed, overlapped gradient all-reduce (`DataParallel`), the
collective bandwidth table, and the per-rank health check. ZeRO/FSDP, TP, PP and the
torch-native path arrive with the rest of the parallelism issue.

Papers: Li et al. 2020 (PyTorch DDP: gradient bucketing and overlap); Rajbhandari et al. 2020
(ZeRO); Shoeybi et al. 2019 (Megatron-LM); Huang et al. 2019 (GPipe); Narayanan et al. 2021
(1F1B); NVIDIA's nccl-tests (bus bandwidth).

Run (always under torchrun; gloo on CPU, NCCL on GPU):
    torchrun --nproc_per_node=2 parallel.py bench     # bus bandwidth of each collective by size
    torchrun --nproc_per_node=2 parallel.py health    # a timed matmul and all-reduce on every rank
"""

import contextlib
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

# torch 2.13 renamed the flat-tensor collectives; older versions have only the old names.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def init(backend=None):
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR):
    NCCL when there is a GPU, gloo otherwise. Returns (rank, world_size, device)."""
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


# -----------------------------------------------------------------------------
# Data parallelism

class _Bucket:
    """A run of parameters whose gradients travel in one all-reduce: one flat buffer, each
    parameter a slice of it. Few large messages beat many small ones (each message pays the
    network's latency once)."""

    def __init__(self, params):
        self.params = params
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.buffer = torch.zeros(self.offsets[-1], dtype=params[0].dtype, device=params[0].device)
        self.ready, self.work = set(), None

    def slice(self, i):
        return self.buffer[self.offsets[i]:self.offsets[i + 1]]


class DataParallel(nn.Module):
    """Wraps a model so that after loss.backward() every rank holds the gradients averaged over
    all ranks, as torch's DistributedDataParallel does, written out:

    - At construction, rank 0's weights (and buffers) are broadcast: replicas start equal.
    - Parameters are grouped into buckets of about bucket_mb, in reverse order of definition,
      which is roughly the order the backward pass produces their gradients.
    - A hook on each parameter fires when its gradient is complete; it copies the gradient into
      its bucket, and when a bucket is full, starts that bucket's all-reduce without waiting
      (async_op): the backward pass carries on with earlier layers meanwhile.
    - At the end of the backward pass (a callback queued on the autograd engine), wait for every
      bucket, divide by the world size and copy the averages back into .grad. A parameter that
      got no gradient this step (an unused branch) contributes zeros.
    - `no_sync()`: gradient accumulation. Inside it the hooks do nothing and gradients pile up
      locally; the next backward outside it averages the accumulated sum.
    The weights stay identical on every rank because every rank applies the same averaged
    gradient with the same optimizer."""

    def __init__(self, module, bucket_mb=25.0, group=None):
        super().__init__()
        self.module, self.group = module, group
        self.world = dist.get_world_size(group)
        self.sync, self._pending = True, False
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets, run, size = [], [], 0
        for p in reversed(params):
            if run and size + p.numel() * p.element_size() > bucket_mb * 2 ** 20:
                self.buckets.append(_Bucket(run))
                run, size = [], 0
            run.append(p)
            size += p.numel() * p.element_size()
        if run:
            self.buckets.append(_Bucket(run))
        self._where = {p: (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in params]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def _grad_ready(self, p):
        if not self.sync:
            return
        if not self._pending:   # the first gradient of this backward: finish after the last one
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._pending = True
        bucket, i = self._where[p]
        bucket.slice(i).copy_(p.grad.flatten())
        bucket.ready.add(i)
        if len(bucket.ready) == len(bucket.params):
            bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def _finish(self):
        for bucket in self.buckets:
            if bucket.work is None:   # some parameter got no gradient: it adds zeros
                for i in set(range(len(bucket.params))) - bucket.ready:
                    bucket.slice(i).zero_()
                bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.buffer /= self.world
            for i, p in enumerate(bucket.params):
                grad = bucket.slice(i).view_as(p)
                if p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.copy_(grad)
            bucket.ready, bucket.work = set(), None
        self._pending = False

    def remove_hooks(self):
        """Detach from the module (its parameters keep no hook of ours)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


# -----------------------------------------------------------------------------
# The layout: which ranks share what

def make_mesh(tp=1, pp=1, device_type="cpu"):
    """The world as a grid of shape (pp, dp, tp), a torch DeviceMesh with those dimension names;
    the data-parallel degree dp is whatever remains of the world size. mesh["tp"].get_group()
    is this rank's tensor-parallel group, and so on.

    Row-major order puts tensor parallelism innermost: the ranks of a TP group are consecutive,
    so on a node of 8 GPUs they share NVLink. TP communicates inside every layer, forward and
    backward; DP once per step (overlapped with the backward); PP only activations between
    neighbours. So TP stays inside a node, and PP is what crosses the slow links."""
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(f"tensor ({tp}) x pipeline ({pp}) parallel degrees must divide the world size "
                         f"({world}); the data-parallel degree is what remains")
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (pp, world // (tp * pp), tp), mesh_dim_names=("pp", "dp", "tp"))


# -----------------------------------------------------------------------------
# The torch-native path: the same layout with torch's FSDP2 and DTensor

def torch_parallelize(model, mesh, fsdp=True):
    """Production engines for what this file writes out by hand: tensor parallelism with
    DTensor's parallelize_module (q/k/v and gate/up column-wise, o and down row-wise; the
    embedding, norms and head stay replicated over the TP ranks), then FSDP2's fully_shard
    over the data-parallel ranks, one unit per block and one for the rest. Returns the model,
    whose parameters are now DTensors. Without fsdp the caller wraps it in DDP (only when
    tp == 1: DDP does not take DTensor parameters)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    tp = mesh["tp"].size()
    if tp > 1:
        for i, block in enumerate(model.layers):
            attn, mlp = block.self_attn, block.mlp
            if attn is None or not hasattr(attn, "q_proj") or not hasattr(mlp, "gate_proj"):
                raise ValueError(f"layers.{i}: torch tensor parallelism here splits GQA attention and the dense "
                                 "SwiGLU MLP; MLA, Mamba-2 and MoE layers are not split")
            if attn.n_kv_head % tp or attn.n_head % tp:
                raise ValueError(f"layers.{i}: {attn.n_head} query and {attn.n_kv_head} key/value heads do not "
                                 f"split over {tp} ranks (the scratch path, --parallel_impl scratch, replicates "
                                 "K/V heads when there are fewer than ranks)")
            parallelize_module(block, mesh["tp"], {
                "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel()})
            # the projections' outputs are local tensors holding this rank's heads
            attn.n_head, attn.n_kv_head = attn.n_head // tp, attn.n_kv_head // tp
    if fsdp:
        for block in model.layers:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


def grad_norm(params):
    """The global L2 norm of the gradients of `params`, whatever their layout: a DTensor's
    vector norm is itself a DTensor (a partial sum over the ranks that hold pieces), which
    full_tensor() completes. Parameters on different meshes (TP-split blocks, replicated
    embeddings) are summed one by one, which torch's own clip_grad_norm_ refuses to mix."""
    total = None
    for p in params:
        if p.grad is None:
            continue
        n = torch.linalg.vector_norm(p.grad.float())
        n = n.full_tensor() if hasattr(n, "full_tensor") else n
        total = n.square() if total is None else total + n.square()
    return total.sqrt() if total is not None else torch.zeros(())


# -----------------------------------------------------------------------------
# The network, measured: bus bandwidth as nccl-tests define it

# A collective's algorithm bandwidth is bytes / time; its bus bandwidth corrects for how much
# each rank really sends, so that one number compares with the link's speed whatever the rank
# count. A ring all-reduce sends 2 (n-1)/n of the buffer per rank (reduce-scatter, then
# all-gather); all-gather, reduce-scatter and all-to-all send (n-1)/n of the whole.
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n}


def _collective(op, n_bytes, world, device):
    """(fn, bytes): a callable running one collective on a buffer of n_bytes (the whole gathered
    or reduced tensor, as nccl-tests size it), in float32."""
    n = max(world, n_bytes // 4 // world * world)
    full = torch.ones(n, device=device)
    part = torch.ones(n // world, device=device)
    fns = {"all_reduce": lambda: dist.all_reduce(full),
           "all_gather": lambda: all_gather_flat(full, part),
           "reduce_scatter": lambda: reduce_scatter_flat(part, full),
           "all_to_all": lambda: dist.all_to_all_single(torch.empty_like(full), full)}
    return fns[op], n * 4


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth_table(sizes=None, ops=tuple(BUS_FACTOR), iters=10, device=None):
    """Every rank runs each collective at each size (warm-up, then `iters` timed calls, each
    ended by a barrier so that the slowest rank sets the time); returns rows of (op, bytes,
    seconds, algbw, busbw) in bytes/s, the same on every rank."""
    world = dist.get_world_size()
    device = device or torch.device("cpu")
    sizes = sizes or [2 ** k for k in range(10, 27, 2)]    # 1 KiB .. 64 MiB
    rows = []
    for op in ops:
        for size in sizes:
            fn, n_bytes = _collective(op, size, world, device)
            fn()
            _sync(device)
            times = []
            for _ in range(iters):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times.append(time.perf_counter() - t0)
            t = torch.tensor([statistics.median(times)])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)      # the collective is as slow as its slowest rank
            sec = t.item()
            rows.append((op, n_bytes, sec, n_bytes / sec, n_bytes / sec * BUS_FACTOR[op](world)))
    return rows


def print_bandwidth(rows, world, backend):
    print("| collective | size | time | algbw (GB/s) | busbw (GB/s) |\n|---|---|---|---|---|")
    for op, n_bytes, sec, alg, bus in rows:
        size = f"{n_bytes / 2**20:.0f} MiB" if n_bytes >= 2 ** 20 else f"{n_bytes / 2**10:.0f} KiB"
        print(f"| {op} | {size} | {sec * 1e6:,.0f} us | {alg / 1e9:.2f} | {bus / 1e9:.2f} |")
    print(f"\n{world} ranks, {backend}; busbw = algbw x 2(n-1)/n for all-reduce, x (n-1)/n for the others "
          "(nccl-tests' definition): compare it with the link's bandwidth")


# -----------------------------------------------------------------------------
# Node health: find the slow rank before it slows everyone

def health_check(device=None, matmul=1024, allreduce_mb=16, iters=5, slow=1.5):
    """Every rank times a (matmul x matmul) float32 matmul and an all-reduce of allreduce_mb.
    Returns (per-rank matmul seconds, per-rank all-reduce seconds, the ranks whose matmul takes
    `slow` times the other ranks' median or more): a throttled or misconfigured GPU shows up here, before
    it sets the pace of every collective in the run."""
    device = device or torch.device("cpu")
    a = torch.randn(matmul, matmul, device=device)
    buf = torch.ones(allreduce_mb * 2 ** 20 // 4, device=device)

    def timed(fn):
        fn()
        _sync(device)
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    mine = torch.tensor([timed(lambda: a @ a), timed(lambda: dist.all_reduce(buf))], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    mm, ar = [t[0].item() for t in every], [t[1].item() for t in every]
    # each rank against the median of the others, so that with two ranks the slow one is
    # measured against the healthy one and not against a median it drags up itself
    return mm, ar, [r for r, t in enumerate(mm) if t >= slow * statistics.median(mm[:r] + mm[r + 1:] or [t])]


def _main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else "bench"
    if "RANK" not in os.environ:
        raise SystemExit(f"parallel.py {cmd}: run it under torchrun, e.g. torchrun --nproc_per_node=2 parallel.py {cmd}")
    rank, world, device = init()
    if cmd == "bench":
        sizes = [2 ** k for k in range(10, 29 if device.type == "cuda" else 27, 2)]
        rows = bandwidth_table(sizes, device=device)
        if rank == 0:
            print_bandwidth(rows, world, dist.get_backend())
    elif cmd == "health":
        mm, ar, slow = health_check(device)
        if rank == 0:
            for r in range(world):
                print(f"rank {r}: matmul {mm[r] * 1e3:.2f} ms, all-reduce {ar[r] * 1e3:.2f} ms")
            print(f"slow ranks (matmul >= 1.5x the other ranks' median): {slow or 'none'}")
    else:
        raise SystemExit(f"parallel.py: unknown command {cmd!r} (bench, health)")
    dist.destroy_process_group()


if __name__ == "__main__":
    _main()
