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

The file, in order: DataParallel; ZeRO stages 1-3 (FSDP); tensor parallelism (Megatron's
column/row linears, heads, the vocabulary-parallel embedding, head and cross-entropy, and the
replica check that catches SmolLM3's seed bug); pipeline parallelism (GPipe and 1F1B); the
mesh that combines them (pp x dp x tp); the torch-native path (FSDP2's fully_shard and DTensor's
parallelize_module), for when a run outgrows this file; then the network: bus bandwidth and the
per-rank health check; and the memory per GPU of a layout, planned before the run (memory_plan,
train.py --plan). train.py composes them (--tp, --pp, --fsdp, --parallel_impl).

Papers: Li et al. 2020 (PyTorch DDP: gradient bucketing and overlap); Rajbhandari et al. 2020
(ZeRO); Zhao et al. 2023 (PyTorch FSDP); Shoeybi et al. 2019 (Megatron-LM); Huang et al. 2019
(GPipe); Narayanan et al. 2021 (1F1B); NVIDIA's nccl-tests (bus bandwidth).

Run (under torchrun; gloo on CPU, NCCL on GPU):
    torchrun --nproc_per_node=2 parallel.py bench     # bus bandwidth of each collective by size
    torchrun --nproc_per_node=2 parallel.py health    # a timed matmul and all-reduce on every rank
    torchrun --nproc_per_node=2 parallel.py zero      # bytes per rank at ZeRO stages 1, 2, 3 against the paper's
    torchrun --nproc_per_node=2 parallel.py tp        # a SwiGLU MLP split over ranks, and the SmolLM3 seed bug caught
    python parallel.py pp                             # the pipeline bubble, and GPipe's and 1F1B's timelines
"""

import contextlib
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

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


# =============================================================================
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
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

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

    def reduce_now(self):
        """Average the gradients accumulated so far, outside a backward pass: a pipeline step
        runs many backwards (inside no_sync), then this once."""
        for bucket in self.buckets:
            for i, p in enumerate(bucket.params):
                if p.grad is not None:
                    bucket.slice(i).copy_(p.grad.flatten())
                    bucket.ready.add(i)
        self._finish()


# =============================================================================
# ZeRO stages 1, 2 and 3 (FSDP)
#
# The concept. Data parallelism keeps W identical copies of everything a model needs in training:
# the weights P, the gradients G and the optimizer state O (Adam: two more tensors per weight, so
# O = 2P in float32, more with fp32 master weights under mixed precision). Only the batch is split.
# ZeRO notices that each rank needs the whole of these only briefly, and shards them over the W
# ranks instead, one more thing per stage:
# - stage 1 shards the optimizer state: each rank updates only its 1/W of every parameter, then
#   the updated pieces are all-gathered back into full weights.          memory: P + G + O/W
# - stage 2 shards the gradients too: each block's gradient is reduce-scattered as soon as it is
#   complete, leaving each rank the summed gradient of its own piece, and the full gradient is
#   freed at once (stage 1 keeps every full gradient until the end of the backward).
#                                                                        memory: P + G/W + O/W
# - stage 3 (FSDP) shards the weights as well: each block's full weights are all-gathered just
#   before its forward, freed after it, gathered again before its backward and freed again once
#   its gradients are reduce-scattered.                                  memory: (P + G + O)/W
#   plus the full weights of the block or two being computed.
# The communication barely grows: an all-reduce is a reduce-scatter plus an all-gather, which is
# exactly what stages 1 and 2 do; stage 3 adds one more all-gather of the weights for the
# backward (1.5x DP's volume), and overlaps it with compute in real engines.
#
# The playbook's lesson: shard the optimizer state first (it is the biggest and the cheapest to
# shard), then the gradients, then the weights, and only as far as memory requires: every stage
# adds collectives on the critical path, and stage 3 pays for them at every layer.
#
# The layout is FSDP2's, so checkpoints line up with torch's: every parameter is split on dim 0,
# padded with zero rows to a multiple of W; rank r holds rows [r c, (r + 1) c), c = ceil(rows / W).
# After wrapping, the module's registered parameters ARE these shards, under their old names:
# an optimizer built afterwards holds (and keeps state for) 1/W of the model, and state_dict()
# is the sharded checkpoint. zero_full / zero_local turn any tensor shaped like a shard (the
# weight, its gradient, its AdamW moments) into the whole tensor and back: a checkpoint that
# does not depend on W (train.py writes its checkpoints that way).

# -----------------------------------------------------------------------------
# One parameter, sharded

def _storage_bytes(tensors):
    """Bytes of the distinct storages behind `tensors` (a view and its base count once; a freed
    storage counts 0): what is really allocated, not what the shapes say."""
    seen = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


class _Param:
    """One parameter under ZeRO: the shard (this rank's rows, registered in the module in place
    of the parameter) and the full working copy (what the module computes with).

    Where the full copy lives: module.__dict__[name]. Python's attribute lookup finds an
    instance's __dict__ before nn.Module.__getattr__ is asked (which is where _parameters are
    looked up), so `self.weight` inside the module's forward returns the full tensor, while
    named_parameters(), state_dict() and the optimizer see the shard in _parameters. The full
    copy is a leaf that requires grad: autograd accumulates the full gradient into full.grad,
    and a post-accumulate-grad hook on it tells us when that gradient is complete."""

    def __init__(self, p, places, names, rank, world, stage):
        if p.dim() == 0:
            raise ValueError(f"ZeRO shards parameters on dim 0; {names[0]} is a scalar: make it shape (1,)")
        self.places, self.names = places, names             # [(module, attr)], [qualified names]
        self.shape, self.rest = p.shape, tuple(p.shape[1:])
        self.rows, self.world = p.shape[0], world
        self.c = -(-self.rows // world)                     # rows per rank, padding included
        self.lo = rank * self.c
        self.n = self.c * math.prod(self.rest)              # elements of one shard
        self.nbytes = p.numel() * p.element_size()          # of the full tensor
        padded = self.pad(p.detach().clone())
        if stage < 3:
            # Stages 1 and 2 keep the full weights anyway, so the shard is a view of this rank's
            # rows of them, not a second copy: the optimizer writes straight into the full
            # weights, and the all-gather only has to bring in the other ranks' rows.
            self.full = padded[:self.rows].detach().requires_grad_(p.requires_grad)
            self.shard = nn.Parameter(padded[self.lo:self.lo + self.c], requires_grad=p.requires_grad)
        else:
            # Stage 3 keeps the shard alone; the full copy is an empty shell whose storage is
            # allocated (resize_) only while its unit is gathered.
            self.shard = nn.Parameter(padded[self.lo:self.lo + self.c].clone(), requires_grad=p.requires_grad)
            self.full = torch.empty_like(p).requires_grad_(p.requires_grad)
            self.full.untyped_storage().resize_(0)
        # What an inner split marked on the parameter: tensor parallelism's layout (tp_dim,
        # tp_slots) stays on the shard, and its gradient sum runs on the copy that gets gradients.
        for k, v in vars(p).items():
            setattr(self.shard, k, v)
        if hasattr(p, "tp_grad_hook"):
            self.full.register_hook(p.tp_grad_hook)
        for module, attr in places:
            module._parameters[attr] = self.shard
            module.__dict__[attr] = self.full

    def pad(self, t):
        """t (rows, ...) with zero rows appended to W c rows: each rank's rows are then one
        equal slice, which is what the flat collectives need."""
        extra = self.world * self.c - self.rows
        return torch.cat([t, t.new_zeros(extra, *self.rest)]) if extra else t


class _Unit:
    """A group of parameters gathered and freed together: one block, or the root (everything no
    block owns). One all-gather and one reduce-scatter per unit, not per parameter: each message
    pays the network's latency once, so a few large ones beat many small ones."""

    def __init__(self, module, params):
        self.module, self.params = module, params
        self.trainable = [p for p in params if p.full.requires_grad]
        self.gathered, self.versions, self.ready, self.reduced = False, None, set(), False


# -----------------------------------------------------------------------------
# ZeRO

class ZeRO(nn.Module):
    """Wraps `module` in place: its parameters become this rank's shards (see _Param), and hooks
    gather full weights and shard gradients around the forward and backward passes.

    stage 1: full weights and full gradients stay on every rank; at the end of the backward the
      gradients are reduce-scattered (averaged): each rank receives the sum of its own rows,
      all its optimizer needs, as shard.grad.
    stage 2: as 1, but each unit's gradients are reduce-scattered into shard.grad as soon as the
      unit's last gradient is accumulated, and the full gradients are freed at once.
    stage 3: full weights exist only around each unit's forward and backward.
    In every stage optimizer.step() updates the shards only; the full weights are refreshed by an
    all-gather before the next forward, which spots changed shards by their version counter:
    every in-place write to a tensor (the optimizer's, load_state_dict's) bumps it.

    units: the modules gathered one at a time in stage 3 (and the grain of the collectives in
    all stages); default: each element of module.layers. The root unit is everything else
    (embeddings, final norm, head): it stays gathered from the model's forward to the end of its
    backward, because the head runs last in the forward and the embedding last in the backward;
    a forward under no_grad in between frees it, and the backward gathers it again.

    Gradients are averaged over the group's W ranks: each rank takes 1/W of the batch and its
    loss is its local mean. Every rank must run the same graph (same units, same parameters
    getting gradients): the collectives are matched by their order."""

    def __init__(self, module, stage=3, group=None, units=None):
        super().__init__()
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1 (optimizer state), 2 (+ gradients) or 3 (+ weights, "
                             f"FSDP); got {stage!r}")
        units = self._check_units(module, units)
        if not dist.is_initialized():
            raise RuntimeError("ZeRO needs torch.distributed: call dist.init_process_group (under torchrun: "
                               "parallel.init()) before wrapping the model")
        self.module, self.stage, self.group = module, stage, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.sync, self._queued, self._pinned = True, False, False
        self.peak_gathered = self.peak_grads = 0     # bytes, the most alive at once since wrapping
        self._broadcast(module)
        self.params = self._shard(module)
        self._by_shard = {id(p.shard): p for p in self.params}
        self.units = self._make_units(module, units)
        self.root = self.units[-1]
        for unit in self.units:
            for p in unit.trainable:
                p.full.register_post_accumulate_grad_hook(lambda _, unit=unit, p=p: self._grad_ready(unit, p))
        module.register_forward_pre_hook(self._before_root)
        module.register_forward_hook(self._after_root)
        if stage == 3:
            for unit in self.units[:-1]:
                unit.module.register_forward_pre_hook(lambda *_, unit=unit: self._gather(unit))
                unit.module.register_forward_hook(lambda m, a, out, unit=unit: self._after_unit(unit, out))
        else:
            for unit in self.units:   # full weights from the start, as they will stay
                self._gather(unit, force=True)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # -- construction

    def _broadcast(self, module):
        """Rank 0's weights and buffers everywhere: the replicas start equal."""
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t, src=src, group=self.group)

    @staticmethod
    def _check_units(module, units):
        if units is None:
            layers = getattr(module, "layers", None)
            units = list(layers) if isinstance(layers, nn.ModuleList) else []
        units = list(units)
        inside = {id(m) for m in module.modules() if m is not module}
        for u in units:
            if id(u) not in inside:
                raise ValueError(f"ZeRO units must be submodules of the wrapped module (the root is always "
                                 f"a unit of its own); got a {type(u).__name__} that is not")
            if any(v is not u and any(m is v for m in u.modules()) for v in units):
                raise ValueError(f"ZeRO units must not nest: a {type(u).__name__} unit contains another unit")
        return units

    def _shard(self, module):
        """One _Param per distinct parameter: a tied weight (lm_head.weight is
        embed_tokens.weight) has two places and two names but one shard."""
        names, places = {}, {}
        for name, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), (p, []))[1].append(name)
        for m in module.modules():
            for attr, p in m._parameters.items():
                if p is not None:
                    places.setdefault(id(p), []).append((m, attr))
        return [_Param(p, places[key], ns, self.rank, self.world, self.stage) for key, (p, ns) in names.items()]

    def _make_units(self, module, units):
        """Each parameter goes to the one unit that uses it; one used by several units (tied, or
        in a module shared between blocks) or by none goes to the root, which stays gathered
        while any unit runs."""
        root = len(units)
        home = {}    # (id(module), attr) -> the units whose subtree holds that module
        for i, u in enumerate(units):
            for m in u.modules():
                for attr in m._parameters:
                    home.setdefault((id(m), attr), set()).add(i)
        groups = [[] for _ in range(root + 1)]
        for p in self.params:
            owners = set().union(*(home.get((id(m), attr), {root}) for m, attr in p.places))
            groups[owners.pop() if len(owners) == 1 else root].append(p)
        return [_Unit(u, g) for u, g in zip([*units, module], groups)]

    # -- gather and free

    def _gather(self, unit, force=False):
        """All-gather the unit's full weights from the shards, unless they are already there and
        no shard has changed since. One collective: this rank's shards of every parameter of
        the unit, concatenated, go in; out comes a (W, n) buffer whose row r is rank r's shards;
        each parameter's full tensor is copied out of its columns."""
        versions = [p.shard._version for p in unit.params]
        if not unit.params or (unit.gathered and versions == unit.versions and not force):
            return
        mine = torch.cat([p.shard.detach().reshape(-1) for p in unit.params])
        out = mine.new_empty(self.world * mine.numel())
        all_gather_flat(out, mine, group=self.group)
        out, at = out.view(self.world, -1), 0
        for p in unit.params:
            if self.stage == 3:
                p.full.untyped_storage().resize_(p.nbytes)
            # Through .data: a fresh alias with its own version counter. In stage 3, autograd has
            # saved this very tensor for the backward pass, and refilling it through the tensor
            # itself would bump its version and make the backward refuse it as "modified in place".
            p.full.data.copy_(out[:, at:at + p.n].reshape(self.world * p.c, *p.rest)[:p.rows])
            at += p.n
        unit.gathered, unit.versions = True, [p.shard._version for p in unit.params]
        self.peak_gathered = max(self.peak_gathered, _storage_bytes(p.full for p in self.params))

    def _free(self, unit):
        """Stage 3: give the full weights' memory back. resize_(0) keeps the tensor objects (and
        autograd's references to them) and frees only their storage; _gather resizes it back and
        refills it before the backward needs it."""
        if self._pinned:
            return
        for p in unit.params:
            p.full.untyped_storage().resize_(0)
        unit.gathered = False

    # -- hooks

    def _before_root(self, module, args):
        if self.stage < 3:    # after optimizer.step(): bring in the other ranks' updated rows
            for unit in self.units:
                self._gather(unit)
        else:
            self._gather(self.root)

    def _after_root(self, module, args, out):
        """Stage 3: the root stays gathered for the backward (the head runs first in it, right
        after this forward), and the end of the backward frees it. A forward with no backward to
        come (under no_grad) frees it at once. That forward may sit between another forward and
        that one's backward (KTO's baseline on mismatched rows, evaluation, summon_full_params'
        exit): so the backward does not count on the root staying gathered, and gathers it again
        when the gradient reaches the model's outputs, as a block does before its own backward
        (a no-op when nothing freed it: the same shards are still there)."""
        if self.stage < 3:
            return
        if not torch.is_grad_enabled():
            self._free(self.root)
            return
        for t in _tensors(out):
            if t.requires_grad:
                t.register_hook(lambda grad: self._before_unit_backward(self.root))

    def _after_unit(self, unit, out):
        """Stage 3, after a unit's forward: free its weights, and arrange to gather them again
        when the gradient reaches the unit's outputs, i.e. just before its backward starts.
        That is early enough for every node inside the unit that lies on a path to the output:
        the autograd engine runs a node only once all of its gradients have arrived, so a
        router whose logits also feed an auxiliary loss (MoE z-loss) still waits for the
        output's gradient. What it does not cover: weights whose only path to the loss goes
        around the outputs (a loss computed from the weights alone, kept as an attribute)."""
        if self._pinned:
            return
        self._free(unit)
        if torch.is_grad_enabled():
            for t in _tensors(out):
                if t.requires_grad:
                    t.register_hook(lambda grad, unit=unit: self._before_unit_backward(unit))

    def _before_unit_backward(self, unit):
        self._in_backward()
        self._gather(unit)

    def _in_backward(self):
        """The first hook of a backward pass asks the autograd engine to call _backward_done once
        the whole pass is over."""
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _grad_ready(self, unit, p):
        """A full gradient is complete (post-accumulate-grad hook). Stages 2 and 3: when it is the
        unit's last, reduce-scatter the unit and free its full gradients (stage 3: its weights
        too). Stage 3 does so inside no_sync as well: keeping full gradients across micro-batches
        would cost the G that stage 3 exists to save, so it reduce-scatters every micro-batch and
        the shards' .grad accumulate (more traffic, same result)."""
        self._in_backward()
        if self.stage == 1 or (self.stage == 2 and not self.sync):
            return
        unit.ready.add(id(p))
        if len(unit.ready) == len(unit.trainable) and not unit.reduced:
            self._reduce_scatter(unit)
            if self.stage == 3 and unit is not self.root:
                self._free(unit)

    def _backward_done(self):
        """End of a backward pass. Stage 1: reduce-scatter the full gradients now (when not in
        no_sync): a rank's optimizer only needs the sum of its own rows, so half an all-reduce
        does, and the all-gather of the updated weights is the other half (DP's volume). Stages
        2 and 3: units some of whose parameters got no gradient were not reduced yet, and are
        now (their missing gradients count as zeros). Stage 3 frees the root."""
        self._queued = False
        for unit in self.units:
            if (self.sync or self.stage == 3) and not unit.reduced:
                self._reduce_scatter(unit)
            unit.ready, unit.reduced = set(), False
            if self.stage == 3:
                self._free(unit)

    # -- gradients

    def _full_grads(self, unit):
        return [p.full.grad if p.full.grad is not None else torch.zeros_like(p.full) for p in unit.trainable]

    def _reduce_scatter(self, unit):
        """Each rank receives only the sum of its own rows. Every padded gradient
        viewed as (W, n) has rank r's rows in row r; concatenating those along dim 1 puts all of
        rank r's pieces together, in the order reduce_scatter hands them out."""
        unit.reduced = True
        if not unit.trainable:
            return
        flat = torch.cat([p.pad(g).reshape(self.world, -1) for p, g in zip(unit.trainable, self._full_grads(unit))],
                         dim=1).reshape(-1)
        mine = flat.new_empty(flat.numel() // self.world)
        reduce_scatter_flat(mine, flat, group=self.group)
        self._accumulate(unit, mine.div_(self.world))

    def _accumulate(self, unit, mine):
        """Add this rank's averaged rows into shard.grad (gradient accumulation adds, as autograd
        does) and free the full gradients."""
        at = 0
        for p in unit.trainable:
            g = mine[at:at + p.n].view(p.shard.shape)
            p.shard.grad = g if p.shard.grad is None else p.shard.grad.add_(g)
            at += p.n
        self.peak_grads = max(self.peak_grads, self._grad_bytes())
        for p in unit.trainable:
            p.full.grad = None

    def _grad_bytes(self):
        return _storage_bytes(t.grad for p in self.params for t in (p.shard, p.full))

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation: backward passes inside it do not communicate. Stages 1 and 2
        accumulate the full gradients locally, and the first backward outside averages the sum.
        Stage 3 reduce-scatters every micro-batch anyway (see _grad_ready)."""
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    @contextlib.contextmanager
    def summon_full_params(self):
        """Every unit's full weights, kept for the duration (for generation or evaluation outside
        forward()); every rank must enter it. Read-only: writes to them are not scattered back."""
        for unit in self.units:
            self._gather(unit)
        self._pinned = True
        try:
            yield
        finally:
            self._pinned = False
            if self.stage == 3:
                for unit in self.units:
                    self._free(unit)

    # -- accounting

    def memory(self, optimizer=None):
        """Bytes this rank holds now: params (shards and any full copies alive; gathered, the
        latter alone), grads (shards' and full ones), optimizer state; and the most ever alive
        at once since wrapping: peak_gathered (full weights), peak_grads (gradients, at the
        moment of a reduction, when they peak). expected: the ZeRO paper's figures for this
        stage from the unsharded sizes P, G, O: stage 1 P + G + O/W, stage 2 P + G/W + O/W,
        stage 3 (P + G + O)/W. Every stage ends the backward with G/W (the shards' gradients):
        what differs is the peak, G in stage 1, G/W plus one unit's full gradients in 2 and 3."""
        shards, fulls = [p.shard for p in self.params], [p.full for p in self.params]
        state = self._optimizer_state(optimizer) if optimizer is not None else []
        P = sum(p.nbytes for p in self.params)
        G = sum(p.nbytes for p in self.params if p.full.requires_grad)
        O = sum(p.nbytes if v.shape == p.shard.shape else v.numel() * v.element_size() for p, v in state)
        split = {1: (1, 1, self.world), 2: (1, self.world, self.world), 3: (self.world,) * 3}[self.stage]
        expected = {"params": P / split[0], "grads": G / split[1], "optimizer": O / split[2]}
        expected["total"] = sum(expected.values())
        out = {"params": _storage_bytes([*shards, *fulls]), "gathered": _storage_bytes(fulls),
               "grads": self._grad_bytes(),
               "optimizer": _storage_bytes(v for _, v in state), "peak_gathered": self.peak_gathered,
               "peak_grads": self.peak_grads}
        out["total"] = out["params"] + out["grads"] + out["optimizer"]
        out["expected"] = expected
        return out

    def _optimizer_state(self, optimizer):
        """(param record, state tensor) for every tensor in the optimizer's state."""
        if any(id(q) not in self._by_shard for g in optimizer.param_groups for q in g["params"]):
            raise ValueError("the optimizer holds parameters that are not this ZeRO's shards: build the optimizer "
                             "after wrapping the model (ZeRO replaces the parameters with shards)")
        return [(self._by_shard[id(q)], v) for q, s in optimizer.state.items() for v in s.values()
                if torch.is_tensor(v)]


def _tensors(out):
    """The tensors in a module's output (a tensor, or tuples, lists and dicts of them)."""
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def zero_full(shard, rows, group=None):
    """The whole tensor from every rank's rows (ZeRO's layout: dim 0 padded to W c rows, rank r
    holding rows [r c, (r + 1) c)): one all-gather, padding dropped. For any tensor shaped like
    a shard: the parameter, its gradient, its AdamW moments."""
    world = dist.get_world_size(group)
    out = shard.new_empty(world * shard.shape[0], *shard.shape[1:])
    all_gather_flat(out, shard.detach().contiguous(), group=group)
    return out[:rows]


def zero_local(full, group=None):
    """zero_full's inverse: this rank's rows of a whole tensor, padded."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    c = -(-full.shape[0] // world)
    extra = world * c - full.shape[0]
    if extra:
        full = torch.cat([full, full.new_zeros(extra, *full.shape[1:])])
    return full[rank * c:(rank + 1) * c]


def clip_grad_norm_(params, max_norm, group=None, copies=None):
    """torch.nn.utils.clip_grad_norm_ for a model split over the ranks of `group`: each rank's
    gradients are pieces of the whole model's, so the global squared norm is the sum over ranks
    of each rank's sum of squares (one all-reduce), where a piece that several ranks hold alike
    (copies, one count per parameter: TP's replicated norms, a tied matrix on two pipeline
    stages, the whole model under plain DP) is divided by its count so that it adds once.
    Every rank then scales by the same factor: clipping by a rank's own norm would scale the
    pieces of one matrix differently. ZeRO's padding rows have zero gradients and add nothing.
    Returns the total norm; without a process group, torch's clip_grad_norm_."""
    params = [params] if torch.is_tensor(params) else list(params)
    copies = [1] * len(params) if copies is None else list(copies)
    pairs = [(p.grad, n) for p, n in zip(params, copies) if p.grad is not None]
    device = pairs[0][0].device if pairs else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g, n in pairs:
        sq += g.detach().float().pow(2).sum() / n
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sq, group=group)   # every rank calls it, with or without gradients
    total = sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)   # torch's formula: never scales up
    for g, _ in pairs:
        g.detach().mul_(coef.to(g.dtype))
    return total


# =============================================================================
# Tensor parallelism (Megatron-LM)
#
# The concept. Data parallelism copies the whole model onto every GPU; when one layer's weights,
# activations and optimizer state no longer fit, split the matmuls themselves. A linear layer
# y = x W^T can be split two ways:
# - column-parallel: each rank keeps a block of W's output rows and computes its slice of y
#   from the whole x (nothing to communicate in the forward pass);
# - row-parallel: each rank keeps a block of W's input columns, takes its slice of x and gets a
#   partial y; the partial sums are added with one all-reduce.
# A column-parallel matmul whose sharded output feeds a row-parallel one needs no communication
# in between, and an elementwise function (SwiGLU's silu(gate) * up, attention's per-head
# softmax) can sit in the middle as long as it never mixes slices. So an MLP is gate/up by
# columns, down by rows; attention splits by whole heads: q, k, v by columns, o by rows. Each
# sublayer then costs exactly one all-reduce forward (after the row-parallel matmul: "g") and
# one backward (the gradient of the sublayer's replicated input, which every rank only knows in
# part: "f"). The embedding and the head split the vocabulary, and the cross-entropy is computed
# without ever putting the full (tokens x vocabulary) logits on one rank.
#
# The playbook's lesson: TP cuts every layer's memory by tp, but it puts an all-reduce on the
# critical path of every sublayer, twice per step: keep it inside a node (NVLink), never across
# InfiniBand, and combine it with DP/ZeRO (and PP) beyond 8 GPUs. And its most expensive bug:
# SmolLM3's first trillion tokens ran with every TP rank initialising its shards from the same
# seed, so each full matrix was tp copies of one block (a model with a fraction of its
# parameters, learning slower, silently). Sharded weights must *differ* between ranks; replicated
# ones must be *identical*. `check_replicas` tests both, and `tp_seed` gives the per-rank seed.

def _tp(group):
    return dist.get_world_size(group), dist.get_rank(group)


# -----------------------------------------------------------------------------
# The conjugate operators (Megatron's f and g)
#
# Inside a sublayer each rank holds a slice; outside it, the residual stream is replicated:
# every rank holds the same (B, T, dim) activations. f enters the parallel region: identity
# forward (every rank already has x), but in the backward pass each rank's dL/dx only counts
# the paths through its own slice, so the gradients are summed (all-reduce). g leaves it: the
# row-parallel partial outputs are summed forward, and the gradient of a sum is the same for
# every term, so backward is the identity. Each is the other's transpose.

class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()   # never reduce into a buffer autograd may still share
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather slices along the last dimension; backward keeps this rank's slice of the
    gradient (every rank holds the whole, identical gradient of the gathered tensor)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        tp, _ = _tp(group)
        parts = [torch.empty_like(x) for _ in range(tp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        tp, rank = _tp(ctx.group)
        return grad.chunk(tp, dim=-1)[rank].contiguous(), None


def copy_to_tp(x, group=None):
    """f: identity forward, all-reduce (sum) of the gradient backward."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x, group=None):
    """g: all-reduce (sum) forward, identity backward."""
    return _ReduceFromTP.apply(x, group)


def gather_from_tp(x, group=None):
    """All-gather along the last dimension forward, split backward."""
    return _GatherFromTP.apply(x, group)


# -----------------------------------------------------------------------------
# Marking parameters: what each rank holds
#
# Every parameter of a sharded model carries two attributes:
#   tp_dim   the dimension it was cut along (None: not cut),
#   tp_slots how many distinct blocks exist across the group (tp: a shard per rank; 1: the
#            whole tensor, replicated on every rank; in between: replicated KV heads, each
#            block held by tp / tp_slots ranks).
# Rank r holds block r * tp_slots // tp. The gathering of full weights, the replica check, the
# gradient norm and the broadcast below read nothing else.

def _mark(p, dim, slots):
    p.tp_dim, p.tp_slots = dim, slots
    return p


def _slot(p, tp, rank):
    return rank * getattr(p, "tp_slots", 1) // tp


def _sum_grad_over_sharers(p, group):
    """A replicated parameter whose *consumers* are split over the ranks (QK-norm weights: each
    rank normalises only its own heads; a KV head shared by query heads on several ranks):
    each rank's gradient is a partial sum and the full one is their total, over the ranks
    holding the same block. The hook runs on each backward's gradient before it is accumulated
    into .grad, so gradient accumulation and a DataParallel wrapper see the summed gradient."""
    tp, rank = _tp(group)
    slots, slot = p.tp_slots, _slot(p, tp, rank)
    if not p.requires_grad:    # frozen: no gradient to sum
        return

    def hook(grad):
        # one all-reduce over the whole group, each block in its own row of a zero buffer:
        # ranks holding different blocks add zeros to each other (no sub-groups to create)
        buf = grad.new_zeros(slots, *grad.shape)
        buf[slot] = grad
        dist.all_reduce(buf, group=group)
        return buf[slot]

    p.register_hook(hook)
    p.tp_grad_hook = hook      # for a wrapper that computes with a copy of p (ZeRO's full weights)


def _shard(p, dim, slots, group, partial_grad=False):
    """A new Parameter holding this rank's block of p (cut into `slots` blocks along dim)."""
    tp, rank = _tp(group)
    size = p.shape[dim] // slots
    block = p.detach().narrow(dim, rank * slots // tp * size, size).clone()
    q = _mark(nn.Parameter(block, requires_grad=p.requires_grad), dim, slots)
    if partial_grad and slots < tp:
        _sum_grad_over_sharers(q, group)
    return q


# -----------------------------------------------------------------------------
# Parallel layers

class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T + b_r: this rank's block of output features; the output stays sharded (it
    feeds a row-parallel layer, or an elementwise op then one). copy_input applies f to x;
    tensor_parallel turns it off for q/k/v (and gate/up) and applies f once to the sublayer's
    input instead: one all-reduce in backward for the three matmuls together (Megatron fuses
    them into one QKV matmul to the same end). copy_input=False is right only for an input
    that already went through f: otherwise its gradient stays partial. slots < tp: replicated blocks (KV heads when
    n_kv_head < tp), each held by tp / slots ranks that use it for different query heads, so
    their gradients are summed over those ranks after every backward (automatic: a hook)."""

    def __init__(self, linear, group=None, copy_input=True, slots=None):
        super().__init__()
        tp, _ = _tp(group)
        slots = slots or tp
        self.group, self.copy_input = group, copy_input
        self.in_features, self.out_features = linear.in_features, linear.out_features // slots
        self.weight = _shard(linear.weight, 0, slots, group, partial_grad=True)
        self.bias = _shard(linear.bias, 0, slots, group, partial_grad=True) if linear.bias is not None else None

    def forward(self, x):
        if self.copy_input:
            x = copy_to_tp(x, self.group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T + b: this rank's block of input features (a column-parallel output),
    the partial products summed by g. The bias is added once, after the sum (on every rank: it
    is replicated, and its gradient, the gradient of y, is the same everywhere)."""

    def __init__(self, linear, group=None):
        super().__init__()
        tp, _ = _tp(group)
        self.group = group
        self.in_features, self.out_features = linear.in_features // tp, linear.out_features
        self.weight = _shard(linear.weight, 1, tp, group)
        self.bias = None
        if linear.bias is not None:
            self.bias = _mark(nn.Parameter(linear.bias.detach().clone()), None, 1)

    def forward(self, x):
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rank r keeps rows [r V/tp, (r+1) V/tp) of the table. A token outside that range looks
    up zeros, so exactly one rank contributes each token's row, and g (all-reduce) gives every
    rank the full embedding. Backward is the identity: each rank's rows get the full gradient
    of their own tokens."""

    def __init__(self, embedding, group=None):
        super().__init__()
        tp, rank = _tp(group)
        self.group = group
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.weight = _shard(embedding.weight, 0, tp, group)
        self.vocab_start = rank * self.weight.shape[0]

    def forward(self, ids):
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(x.masked_fill(outside[..., None], 0.0), self.group)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """loss = mean over tokens of (lse - logit[label]) + z_coef * mean(lse^2), from this rank's
    logits l_r = h W_r^T alone (rows, V/tp): the full logits never exist anywhere.

    Forward: the max over the vocabulary is the all-reduce (MAX) of the local maxima; then
    sum(exp(l - max)) and the label's logit (from the one rank whose block holds the label, 0
    elsewhere) are summed in a single all-reduce: lse = max + log(sum). Three numbers per token
    cross the network instead of V/tp * (tp - 1).
    Backward, by hand: d/dl of (ce + z lse^2) = softmax(l) (1 + 2 z lse) - onehot(label), where
    softmax(l_r) = exp(l_r - lse) needs only this rank's logits (lse is global already), and the
    onehot is this rank's only if it owns the label. Then dW_r = g^T h (this rank's shard, done)
    and dh = g W_r, a partial sum over ranks: the caller applies f to h first, so autograd sums
    it. The logits are recomputed in backward (one more matmul) instead of saved: memory for
    the loss stays one (rows, V/tp) block, live only inside forward and backward."""

    @staticmethod
    def forward(ctx, h, weight, labels, z_coef, vocab_start, group):
        n_local = weight.shape[0]
        logits = (h @ weight.to(h.dtype).t()).float()
        m = logits.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        local = labels - vocab_start
        mine = (local >= 0) & (local < n_local)
        local = local.clamp(0, n_local - 1)
        rows = torch.arange(labels.numel(), device=labels.device)
        target = torch.where(mine, logits[rows, local], 0.0)
        sums = torch.stack([torch.exp(logits - m[:, None]).sum(-1), target])
        del logits
        dist.all_reduce(sums, group=group)
        lse = m + sums[0].log()
        token_ce = lse - sums[1]
        n = max(labels.numel(), 1)
        z = lse.pow(2).sum() / n
        ctx.save_for_backward(h, weight, lse, local, mine)
        ctx.n, ctx.z_coef = n, z_coef
        ctx.mark_non_differentiable(token_ce, z)
        return token_ce.sum() / n + z_coef * z, token_ce, z

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_ce, _grad_z):
        h, weight, lse, local, mine = ctx.saved_tensors
        w = weight.to(h.dtype)
        g = torch.exp((h @ w.t()).float() - lse[:, None])                  # softmax, this block
        g.mul_((1 + 2 * ctx.z_coef * lse)[:, None])
        rows = torch.arange(local.numel(), device=local.device)
        g[rows[mine], local[mine]] -= 1
        g.mul_(grad_loss.float() / ctx.n)
        g = g.to(h.dtype)
        dh = (g @ w).to(h.dtype) if ctx.needs_input_grad[0] else None
        dw = (g.t() @ h).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None


class VocabParallelHead(nn.Module):
    """The output head over this rank's block of the vocabulary. weight: this rank's shard (the
    embedding's very Parameter when tied: the same rows, the same split). forward(h) gathers
    full logits (generation samples from them); loss() never does. Model.head calls loss()."""

    def __init__(self, linear=None, group=None, weight=None):
        super().__init__()
        tp, rank = _tp(group)
        self.group = group
        self.weight = weight if weight is not None else _shard(linear.weight, 0, tp, group)
        self.vocab_start = rank * self.weight.shape[0]
        self.in_features, self.out_features = self.weight.shape[1], self.weight.shape[0] * tp

    def forward(self, h):
        return gather_from_tp(F.linear(copy_to_tp(h, self.group), self.weight), self.group)

    def loss(self, h, labels, z_coef=0.0):
        """(loss, token_ce, z) exactly as model.py's ChunkedCrossEntropy: h (rows, dim) and
        labels (rows,), every row labelled; the loss is the same number on every rank."""
        h = copy_to_tp(h, self.group)
        return VocabParallelCrossEntropy.apply(h, self.weight, labels, float(z_coef), self.vocab_start, self.group)

    def log_probs(self, h, labels, temperature=1.0):
        """log p(label) per position (labels -100 give 0), differentiable, from the vocabulary
        shards: the lse of logits / temperature by the same max / sum all-reduces; no full
        logits. (model.py's log_probs reads lm_head.weight directly and would see one shard:
        Model.log_probs hands itself over here.)"""
        h = copy_to_tp(h, self.group)
        logits = F.linear(h, self.weight.to(h.dtype)).float() / temperature
        m = logits.detach().max(-1, keepdim=True).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        local = labels - self.vocab_start
        mine = (local >= 0) & (local < self.weight.shape[0])
        target = logits.gather(-1, local.clamp(0, self.weight.shape[0] - 1)[..., None]).squeeze(-1)
        sums = torch.stack([(logits - m).exp().sum(-1), torch.where(mine, target, 0.0)])
        sums = reduce_from_tp(sums, self.group)
        return (sums[1] - m.squeeze(-1) - sums[0].log()).masked_fill(labels == -100, 0.0)


# -----------------------------------------------------------------------------
# Sharding a model.py Model (duck typing on Hugging Face's Llama names)

def _refusals(model, tp):
    """What this file cannot shard, as sentences (empty: go ahead)."""
    c, out = model.config, []
    if getattr(c, "attention", "gqa") == "mla":
        out.append("MLA attention (config.attention='mla'): its shared latent projection is not split here")
    if any(getattr(b, "mamba", None) is not None for b in model.layers):
        out.append("Mamba-2 layers: their mixer is not split here")
    if getattr(model, "moe_layers", None) or "moe" in (getattr(c, "ffns", None) or ()):
        out.append("MoE layers: experts are split by expert parallelism, not by TP, here")
    if c.n_head % tp:
        out.append(f"n_head ({c.n_head}) is not divisible by tp ({tp})")
    if c.n_kv_head >= tp and c.n_kv_head % tp:
        out.append(f"n_kv_head ({c.n_kv_head}) is not divisible by tp ({tp})")
    if c.n_kv_head < tp and tp % c.n_kv_head:
        out.append(f"n_kv_head ({c.n_kv_head}) < tp ({tp}) must divide tp (each rank's query heads "
                   "must share one KV head)")
    if c.mlp_dim % tp:
        out.append(f"mlp_dim ({c.mlp_dim}) is not divisible by tp ({tp})")
    if c.padded_vocab % tp:
        out.append(f"padded_vocab ({c.padded_vocab}) is not divisible by tp ({tp}); raise vocab_multiple")
    return out


def _enter_with_f(module, group):
    """Apply f once to the module's input (its first positional argument): one backward
    all-reduce for all the column-parallel matmuls inside."""
    module.register_forward_pre_hook(lambda mod, args: (copy_to_tp(args[0], group), *args[1:]))


def tensor_parallel(model, group=None):
    """Shard a model.py Model in place over `group` and return it. Every rank must have built
    the same full model (same seed, or the same checkpoint): each keeps its slices, so the
    sharded model computes exactly the full model's function and every shard is different.
    Every rank then runs the same (whole) batch. The config keeps the full model's shapes;
    each attention module's n_head / n_kv_head become the local counts."""
    tp, _ = _tp(group)
    problems = _refusals(model, tp)
    if problems:
        raise ValueError(f"tensor_parallel over {tp} ranks: " + "; ".join(problems))
    for block in model.layers:
        attn = block.self_attn
        # Heads are contiguous blocks of head_dim rows in q/k/v (and columns in o), so an even
        # split of rows is a split by whole heads; GQA's query head i reads KV head
        # i // (n_head / n_kv_head), so rank r's query heads read exactly its KV block, or, when
        # there are fewer KV heads than ranks, the one KV head r * n_kv_head // tp.
        kv_slots = min(tp, attn.n_kv_head)
        attn.q_proj = ColumnParallelLinear(attn.q_proj, group, copy_input=False)
        attn.k_proj = ColumnParallelLinear(attn.k_proj, group, copy_input=False, slots=kv_slots)
        attn.v_proj = ColumnParallelLinear(attn.v_proj, group, copy_input=False, slots=kv_slots)
        attn.o_proj = RowParallelLinear(attn.o_proj, group)
        attn.n_head, attn.n_kv_head = attn.n_head // tp, max(attn.n_kv_head // tp, 1)
        # QK-norm's weight (head_dim) is shared by every head, and each rank normalises only its
        # own heads: replicated, with a partial gradient to be summed over the group.
        for norm in (attn.q_norm, attn.k_norm):
            if norm is not None:
                _sum_grad_over_sharers(_mark(norm.weight, None, 1), group)
        _enter_with_f(attn, group)
        if block.mlp is not None:
            mlp = block.mlp
            mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, group, copy_input=False)
            mlp.up_proj = ColumnParallelLinear(mlp.up_proj, group, copy_input=False)
            mlp.down_proj = RowParallelLinear(mlp.down_proj, group)
            _enter_with_f(mlp, group)
    tied = model.lm_head.weight is model.embed_tokens.weight
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, group)
    model.lm_head = (VocabParallelHead(weight=model.embed_tokens.weight, group=group) if tied
                     else VocabParallelHead(model.lm_head, group))
    # Everything else (the block norms, the final norm, learned positions) sees only the
    # replicated residual stream: replicated, and its gradient is already whole on every rank.
    for p in model.parameters():
        if not hasattr(p, "tp_slots"):
            _mark(p, None, 1)
    model.tp_group = group
    return model


# -----------------------------------------------------------------------------
# Seeds and the replica check (the SmolLM3 bug)
#
# Which random numbers must agree across TP ranks and which must differ:
# - agree: anything applied to a replicated tensor. Dropout on the residual stream, or on the
#   embedding output, must drop the same elements on every rank (else the ranks' "replicated"
#   activations silently diverge), and so must any init of a replicated parameter (norms,
#   replicated KV heads): seed the default generator with the shared seed.
# - differ: anything applied to a shard. A shard initialised locally (instead of sliced from a
#   full matrix, which is how big models are built without ever holding the full matrix) with
#   the shared seed makes every rank's block the same: the full matrix is tp copies of one
#   block. Dropout inside the parallel region (on attention probabilities, on a column-parallel
#   output) must also differ, or each rank drops the same pattern in its different slice.
# Megatron keeps two generators for exactly this: the default one seeded alike on every TP
# rank, and a "model-parallel" one seeded with seed + offset + tp_rank, entered around every
# sharded init and dropout.

def tp_seed(seed, group=None):
    """The seed for shard-local randomness (shard init, dropout inside a shard) on this rank:
    seed + tp_rank. Replicated randomness uses `seed` itself."""
    return seed + dist.get_rank(group)


@torch.no_grad()
def check_replicas(model, group=None, atol=0.0):
    """[(parameter name, problem)], the same list on every rank, empty when healthy:
    - ranks holding the same block of a parameter (replicated ones: norms, QK-norms, replicated
      KV heads) must hold identical values (|difference| <= atol);
    - ranks holding different blocks of a sharded parameter must hold different values, unless
      the block is a constant (zero biases and unit norms are equal by design): identical
      random shards are the SmolLM3 seed bug.
    Gathers every parameter once: a check for start-up and after loading, not every step."""
    tp, _ = _tp(group)
    problems = []
    for name, p in model.named_parameters():
        slot_of = [_slot(p, tp, r) for r in range(tp)]
        every = [torch.empty_like(p) for _ in range(tp)]
        dist.all_gather(every, p.detach().contiguous(), group=group)
        constant = bool((every[0] == every[0].flatten()[0]).all())
        for r in range(1, tp):
            found = None
            for q in range(r):
                same = bool(((every[r] - every[q]).abs() <= atol).all())
                if slot_of[q] == slot_of[r] and not same:
                    found = (f"replicated, but ranks {q} and {r} differ by "
                             f"{(every[r] - every[q]).abs().max().item():.3g}")
                elif slot_of[q] != slot_of[r] and same and not constant:
                    found = (f"ranks {q} and {r} hold identical shards of different blocks: initialised "
                             "from the same seed? (the full matrix repeats one block)")
                if found:
                    break
            if found:
                problems.append((name, found))
                break
    return problems


# -----------------------------------------------------------------------------
# Gradient norm and checkpoints
#
# After backward, a replicated parameter's gradient is the same on every TP rank: the
# gradient reaching it is a function of the replicated residual stream and of the gradient
# of the stream, which f's backward all-reduce made whole and identical before it arrived
# (and the QK-norm / replicated-KV hooks summed the partial ones). A sharded parameter's
# gradient is its own block, held nowhere else. So ||grad||^2 of the full model is the sum
# over ranks of the local squares, with each replicated block counted once: divide its square
# by the number of ranks holding it, tp // p.tp_slots (clip_grad_norm_'s `copies`).

@torch.no_grad()
def tp_full(t, p, group=None):
    """The whole of tensor t, which is shaped like parameter p's shard on this rank (p itself,
    its gradient, or one of its AdamW moments), on every rank: the blocks all-gathered and put
    back in order (a replicated K/V head appears once). Replicated parameters come back as they are."""
    tp, _ = _tp(group)
    slots = getattr(p, "tp_slots", 1)
    if slots == 1:
        return t.detach().clone()
    every = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(every, t.detach().contiguous(), group=group)
    return torch.cat([every[s * tp // slots] for s in range(slots)], dim=p.tp_dim)


def tp_local(full, p, group=None):
    """tp_full's inverse: this rank's block of a whole tensor shaped like parameter p."""
    tp, rank = _tp(group)
    slots = getattr(p, "tp_slots", 1)
    if slots == 1:
        return full
    size = full.shape[p.tp_dim] // slots
    return full.narrow(p.tp_dim, _slot(p, tp, rank) * size, size)


# =============================================================================
# Pipeline parallelism (GPipe, 1F1B)
#
# The concept. Split the stack of layers into n consecutive stages, one per rank: rank 0 holds the
# embedding and the first L/n blocks, the last rank the last L/n blocks, the final norm and the
# head. A batch flows forward through the ranks as activations (rows, T, dim) sent to the next
# rank, and its gradient flows back as the gradient of those activations sent to the previous
# rank. Each rank holds 1/n of the weights, gradients and optimizer state, and the only traffic
# is one activation tensor per micro-batch between neighbours: no all-reduce of the weights.
#
# The catch: with one batch, rank s waits for ranks 0..s-1 on the way forward and for the ranks
# after it on the way back; n-1 of every n slots are idle. Cut the batch into m micro-batches and
# the stages work on different micro-batches at once. With every forward and backward taking one
# time slot, the idle part of the timeline (the bubble) is
#
#     bubble = (n - 1) / (m + n - 1)        (bubble_fraction; 4 stages, 8 micro-batches: 27%)
#
# so m >> n makes it small, at the price of small micro-batches (less efficient matmuls).
#
# Two schedules run the same m forwards and backwards in a different order:
# - GPipe (Huang et al. 2019): all forwards, then all backwards. Simple, but every stage keeps
#   the activations of all m micro-batches until their backward: memory grows with m.
# - 1F1B (Narayanan et al. 2021, "PipeDream-Flush"): stage s runs n - s - 1 warm-up forwards,
#   then alternates one forward and one backward, then finishes the remaining backwards. Same
#   bubble, but a micro-batch's activations are freed as soon as its backward ran, so at most
#   n - s micro-batches are alive on stage s (at most n), whatever m is.
#
# The playbook's lesson: pipeline parallelism trades the bubble for very little communication, which
# is why it is the strategy that crosses slow links (between nodes), while tensor parallelism,
# which all-reduces inside every layer, stays inside a node's NVLink domain. Combined with
# gradient accumulation (many micro-batches per optimizer step) the bubble becomes small.

# What a model must offer to be cut into stages (model.py's Model does).
NEEDED = ("embed", "block_inputs", "layers", "norm", "head", "embed_tokens", "lm_head")


def bubble_fraction(n_stages, n_micro):
    """The share of a pipeline's timeline that each stage spends idle, with equal-length forward
    and backward slots: the first micro-batch needs n-1 slots to reach the last stage and the last
    one n-1 slots to come back, around the m slots of useful work: (n-1) / (m+n-1)."""
    return (n_stages - 1) / (n_micro + n_stages - 1)


def split_layers(n_layer, n_stages):
    """[(lo, hi)] per stage: a near-even split. The ceiling puts the extra layers on the early
    stages, because the last stage also runs the head (a (dim x vocab) matmul and the loss)."""
    if n_stages > n_layer:
        raise ValueError(f"PipelineStage: {n_stages} stages need at least as many layers (the model has {n_layer})")
    bounds = [math.ceil(s * n_layer / n_stages) for s in range(n_stages + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


# -----------------------------------------------------------------------------
# The schedules, as plain lists: what one stage runs, in order

def schedule_ops(schedule, n, s, m):
    """[("F", i) | ("B", i), ...]: the forwards and backwards stage s of n runs for m micro-batches."""
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    if schedule == "1f1b":
        # Warm-up: enough forwards that, by the time this stage's first backward can start (its
        # gradient has to come back from the n-s-1 stages after it), the pipe is full.
        warm = min(n - s - 1, m)
        ops = [("F", i) for i in range(warm)]
        for i in range(m - warm):             # steady state: one forward, one backward
            ops += [("F", warm + i), ("B", i)]
        return ops + [("B", i) for i in range(m - warm, m)]   # cool-down: drain the backwards
    raise ValueError(f"pipeline_step: unknown schedule {schedule!r} (gpipe, 1f1b)")


def p2p_plan(schedule, n, s, m):
    """schedule_ops with the communication put in: a list of ("F", i), ("B", i) and
    ("comm", [(kind, i), ...]), kind one of send_act (to s+1), recv_act (from s-1), send_grad
    (to s-1), recv_grad (from s+1).

    Why batches: if every send waited for its receive (NCCL does; gloo may), 1F1B deadlocks when
    done naively: stage s sends micro-batch 1's activations forward while stage s+1 sends
    micro-batch 0's gradient back, and each waits for the other to receive. So the send that
    ends an op is posted together with the receive that starts the next one, as one batch
    (dist.batch_isend_irecv, a NCCL group): both sides' batches then hold both halves of the
    exchange. tests/test_parallel_pp.py checks every (n, m) up to 8 stages for deadlocks under
    those strict semantics."""
    plan, pending = [], []
    for op, i in schedule_ops(schedule, n, s, m):
        need = []
        if op == "F" and s > 0:
            need = [("recv_act", i)]
        if op == "B" and s < n - 1:
            need = [("recv_grad", i)]
        if pending or need:
            plan.append(("comm", pending + need))
        plan.append((op, i))
        pending = []
        if op == "F" and s < n - 1:
            pending = [("send_act", i)]
        if op == "B" and s > 0:
            pending = [("send_grad", i)]
    if pending:
        plan.append(("comm", pending))
    return plan


# -----------------------------------------------------------------------------
# One stage of the pipeline

class PipelineStage(nn.Module):
    """This rank's slice of the model. Stage s of the group's n ranks keeps layers
    split_layers(L, n)[s]; stage 0 keeps the embedding, the last stage the final norm and the
    head; every other module is removed (set to None: its memory is freed, and the optimizer
    built on stage.parameters() only sees this stage's weights). self.model keeps the model's
    own parameter names (layers.5.mlp... stays layers.5.mlp...), so checkpoints of the stages
    merge by a plain dict union.

    Tied embeddings: the first and the last stage both hold the (vocab x dim) matrix, one as the
    embedding and one as the head, starting from stage 0's values; pipeline_step adds their
    two gradients together (sync_tied_grads), so the two copies take the same optimizer step
    and stay equal, as the one matrix of the unsplit model would.

    The whole model is built on every rank before the cut, so construction briefly needs the
    full model's memory (in the optimizer and the training step, only the stage's)."""

    def __init__(self, model, group=None):
        super().__init__()
        missing = [a for a in NEEDED if not hasattr(model, a)]
        if missing:
            raise ValueError(f"PipelineStage: the model has no {', '.join(missing)}; it needs "
                             f"{', '.join(NEEDED)} (model.py's Model)")
        if getattr(model, "moe_layers", None):
            # head() adds up the MoE layers' balancing losses, but only the last stage runs it:
            # the other stages' routers would never be trained to balance.
            raise ValueError("PipelineStage: MoE layers are not supported (their auxiliary losses are summed "
                             "at the head, which would miss the other stages' layers)")
        self.model, self.group = model, group
        if dist.is_initialized():
            self.ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
            if dist.get_rank() not in self.ranks:
                raise ValueError(f"PipelineStage: rank {dist.get_rank()} is not in the group {self.ranks}")
            self.stage = dist.get_rank(group)
        else:                                 # one process: the whole model, no communication
            self.ranks, self.stage = [0], 0
        self.n = len(self.ranks)
        self.lo, self.hi = split_layers(len(model.layers), self.n)[self.stage]
        self.is_first, self.is_last = self.stage == 0, self.stage == self.n - 1
        self.tied = model.lm_head is not None and model.lm_head.weight is model.embed_tokens.weight
        self.dim = model.embed_tokens.weight.shape[1]

        for i in range(len(model.layers)):
            if not self.lo <= i < self.hi:
                model.layers[i] = None        # ModuleList keeps the slot, so the names stay put
        if not self.is_first:
            model.embed_tokens = None         # a tied head keeps its reference to the weight
            if getattr(model, "embed_positions", None) is not None:
                model.embed_positions = None
        if not self.is_last:
            model.norm, model.lm_head = None, None
        self.tied_weight = None
        if self.tied and self.n > 1 and (self.is_first or self.is_last):
            self.tied_weight = model.embed_tokens.weight if self.is_first else model.lm_head.weight
        p = next(self.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.peak_in_flight = 0
        if self.n > 1:
            # A collective on the whole group first: NCCL then sets up its communicator with
            # every rank present, before the point-to-point traffic between pairs.
            dist.barrier(group=group)
            if self.tied_weight is not None:
                with torch.no_grad():         # the head starts as stage 0's embedding
                    if self.is_first:
                        dist.send(self.tied_weight.data.contiguous(), self.ranks[-1], group=group, tag=1)
                    else:
                        dist.recv(self.tied_weight.data, self.ranks[0], group=group, tag=1)

    def forward(self, x, position_ids, input_ids=None, labels=None):
        """This stage's part of the model: from input_ids (first stage) or the previous stage's
        activations x, through its layers, to the next stage's input or (last stage) the head's
        (logits, loss, aux). rope, mask and reset depend only on the positions, so every stage
        computes its own instead of receiving them."""
        m = self.model
        if self.is_first:
            x, rope, mask, reset = m.embed(input_ids, position_ids)
        else:
            rope, mask, reset = m.block_inputs(position_ids)
        for i in range(self.lo, self.hi):
            x = m.layers[i](x, rope, mask, None, reset)
        if self.is_last:
            return m.head(m.norm(x), labels)
        return x

    def sync_tied_grads(self):
        """Add the tied matrix's two gradients, the embedding's (first stage) and the head's (last
        stage), on both: each then holds the gradient the one shared matrix gets in one process.
        A no-op on other stages, with untied embeddings, or with one stage."""
        if self.tied_weight is None:
            return
        w = self.tied_weight
        mine = w.grad if w.grad is not None else torch.zeros_like(w)
        other = torch.empty_like(mine)
        peer = self.ranks[-1] if self.is_first else self.ranks[0]
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, mine.contiguous(), peer, self.group, tag=1),
                                            dist.P2POp(dist.irecv, other, peer, self.group, tag=1)]):
            work.wait()
        # first + last in that order on both ranks, so that the two copies stay bit-identical
        w.grad = mine + other if self.is_first else other + mine


# -----------------------------------------------------------------------------
# The step: forwards and backwards of all micro-batches, activations passed along

def pipeline_step(stage, micro_batches, schedule="1f1b", weights=None):
    """Forward and backward of every micro-batch (dicts of input_ids, labels, position_ids; every
    stage gets the same list, only the last stage reads labels) through the pipeline, in the
    schedule's order. Each loss is scaled by its weight, 1/len(micro_batches) by default, so the
    gradients that pile up in .grad are those of the mean over micro-batches, as gradient
    accumulation gives (train.py passes each micro-batch's share of the step's trained tokens
    instead, for one token mean); step the optimizer afterwards. Gradients add up across calls too (the tied matrix's included).

    Returns (losses, aux): the per-micro-batch losses on every stage (float32 scalars sent from
    the last stage, for logging), and the head's aux dict of each micro-batch on the last stage
    (None on the others). stage.peak_in_flight is the most micro-batches whose activations
    were alive at once on this stage during the step."""
    M, s, n = len(micro_batches), stage.stage, stage.n
    if M == 0:
        raise ValueError("pipeline_step: no micro-batches")
    prev = stage.ranks[s - 1] if s > 0 else None
    nxt = stage.ranks[s + 1] if s < n - 1 else None

    batches = []
    for b in micro_batches:
        ids = b["input_ids"].to(stage.device)
        pos = b.get("position_ids")
        pos = (torch.arange(ids.shape[1], device=stage.device).expand_as(ids) if pos is None
               else pos.to(stage.device))
        labels = b.get("labels") if stage.is_last else None
        batches.append((ids, pos, None if labels is None else labels.to(stage.device)))

    # The step's own gradient of the tied matrix is exchanged at the end; what .grad held before
    # (an earlier call of the same accumulation) was exchanged then, so it is set aside meanwhile.
    w = stage.tied_weight
    held = None
    if w is not None:
        held, w.grad = w.grad, None

    inputs, outputs, received = {}, {}, {}   # per micro-batch: the stage's input x, output, and incoming tensors
    losses, auxes = [None] * M, [None] * M
    in_flight, stage.peak_in_flight = 0, 0

    def communicate(ops):
        p2p = []
        for kind, i in ops:
            if kind == "send_act":
                p2p.append(dist.P2POp(dist.isend, outputs[i].detach().to(stage.dtype).contiguous(), nxt, stage.group))
            elif kind == "send_grad":
                p2p.append(dist.P2POp(dist.isend, inputs.pop(i).grad.contiguous(), prev, stage.group))
            elif kind == "recv_act":
                rows, T = batches[i][0].shape
                received[i] = torch.empty(rows, T, stage.dim, dtype=stage.dtype, device=stage.device)
                p2p.append(dist.P2POp(dist.irecv, received[i], prev, stage.group))
            else:                             # recv_grad: shaped as what this stage sent forward
                received[i] = torch.empty_like(outputs[i], dtype=stage.dtype)
                p2p.append(dist.P2POp(dist.irecv, received[i], nxt, stage.group))
        for work in dist.batch_isend_irecv(p2p):
            work.wait()

    for op, i in p2p_plan(schedule, n, s, M):
        if op == "comm":
            communicate(i)
        elif op == "F":
            ids, pos, labels = batches[i]
            x = None
            if not stage.is_first:
                # A leaf that wants a gradient: its .grad is what goes back to the previous stage.
                x = received.pop(i).requires_grad_()
                inputs[i] = x
            out = stage(x, pos, ids, labels)
            if stage.is_last:
                _, loss, auxes[i] = out
                losses[i] = loss.detach().float()
                outputs[i] = loss * (weights[i] if weights is not None else 1 / M)
            else:
                outputs[i] = out
            in_flight += 1
            stage.peak_in_flight = max(stage.peak_in_flight, in_flight)
        else:                                 # "B"
            out = outputs.pop(i)
            # Last stage: the scaled loss. Others: the output, with the gradient the next stage sent.
            torch.autograd.backward(out, None if stage.is_last else received.pop(i).to(out.dtype))
            in_flight -= 1                    # the graph of micro-batch i is freed by its backward

    if w is not None:
        stage.sync_tied_grads()
        if held is not None:
            w.grad = held + w.grad
    # The losses exist on the last stage only; send them to every stage for logging.
    t = torch.stack(losses) if stage.is_last else torch.empty(M, dtype=torch.float32, device=stage.device)
    if n > 1:
        dist.broadcast(t, stage.ranks[-1], group=stage.group)
    return list(t.unbind()), (auxes if stage.is_last else None)


@torch.no_grad()
def pipeline_forward(stage, batch):
    """Forward only (evaluation), one batch through the stages in turn: each stage receives
    the previous one's activations, runs its layers and sends them on. Returns the head's
    (logits, loss, aux) on the last stage and None on the others."""
    ids = batch["input_ids"].to(stage.device)
    pos = batch["position_ids"].to(stage.device)
    x = None
    if not stage.is_first:
        x = torch.empty(*ids.shape, stage.dim, dtype=stage.dtype, device=stage.device)
        dist.recv(x, stage.ranks[stage.stage - 1], group=stage.group)
    out = stage(x, pos, ids, batch["labels"].to(stage.device) if stage.is_last else None)
    if stage.is_last:
        return out
    dist.send(out.to(stage.dtype).contiguous(), stage.ranks[stage.stage + 1], group=stage.group)
    return None


def pp_copies(stage, p):
    """For clip_grad_norm_ over the pipeline group: the tied matrix is held (with the same
    gradient, after sync_tied_grads) by the first and the last stage; everything else by one."""
    return 2 if p is stage.tied_weight else 1


# -----------------------------------------------------------------------------
# Demo: the bubble, and the two schedules drawn as timelines

def timeline(schedule, n, m):
    """Each stage's row of slots (one forward or one backward each; "." idle): an op starts when
    its stage is free and its input is ready (forward: the previous stage's forward of the same
    micro-batch; backward: the next stage's backward, or on the last stage its own forward)."""
    done, rows = {}, []
    ops = [schedule_ops(schedule, n, s, m) for s in range(n)]
    pos, free = [0] * n, [0] * n
    while any(pos[s] < len(ops[s]) for s in range(n)):
        for s in range(n):
            while pos[s] < len(ops[s]):
                op, i = ops[s][pos[s]]
                dep = ("F", i, s - 1) if op == "F" else ("B", i, s + 1) if s < n - 1 else ("F", i, s)
                if dep[2] < 0:                # stage 0's forwards wait for nothing
                    ready = 0
                elif dep in done:
                    ready = done[dep]
                else:
                    break
                done[(op, i, s)] = free[s] = max(free[s], ready) + 1
                pos[s] += 1
    end = max(free)
    for s in range(n):
        row = ["."] * end
        for (op, i, st), t in done.items():
            if st == s:
                row[t - 1] = str(i % 10) if op == "F" else "abcdefghij"[i % 10]
        rows.append("".join(row))
    return rows


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
    return mm, ar, slow_ranks(mm, slow)


def slow_ranks(times, slow=1.5):
    """The ranks whose time is `slow` times the median of the other ranks' or more. Each rank
    is measured against the others, so that with two ranks the slow one is compared with the
    healthy one and not with a median it drags up itself."""
    return [r for r, t in enumerate(times) if t >= slow * statistics.median(times[:r] + times[r + 1:] or [t])]


def gather_times(seconds, device=None):
    """Every rank's number (a step's compute time), on every rank: one tiny all-gather."""
    mine = torch.tensor([seconds], dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [t.item() for t in every]


# -----------------------------------------------------------------------------
# Memory per GPU of a layout, before renting the GPUs (train.py --plan)
#
# The playbook's "spec what you need": whether a layout fits is arithmetic on the shapes, so do
# it before the run. The conventions are train.py's: weights stay float32 and the forward runs
# under bf16 autocast on CUDA. So a parameter costs 4 bytes (the float32 "master" weight the
# optimizer updates), its gradient 4 (autograd accumulates in the parameter's dtype), AdamW's two
# moments 8 (torch keeps them in the parameter's dtype), plus AdamW's step counter, one float32
# per tensor: 16 bytes per parameter before any sharding, as the ZeRO paper counts (2 + 2 + 12
# there: fp16 weights and gradients, an fp32 master and moments). Autocast adds bf16 copies of
# the matmul weights, cached for the forward and saved for the backward: counted with what
# the backward keeps (the activations column), since they live exactly as long.

def memory_plan(model, seq_len, micro_batch, tp=1, pp=1, dp=1, zero_stage=0, n_micro=1):
    """Bytes on the fullest GPU of a layout of `model` (a model.py Model, duck typed; build it
    on the "meta" device to plan a 3B model without its memory): {"weights", "grads",
    "optimizer", "activations", "total"} at micro-batches of micro_batch x seq_len tokens.
    tp x pp x dp GPUs; zero_stage 0 is plain data parallelism (DataParallel), 1-3 ZeRO over the
    dp ranks (not with pp: train.py does not combine them); n_micro: micro-batches per step
    (gradient accumulation), which a pipeline keeps in flight. An estimate: see the comments."""
    c = model.config
    if tp > 1 and _refusals(model, tp):
        raise ValueError(f"tp {tp}: " + "; ".join(_refusals(model, tp)))
    if pp > 1 and zero_stage:
        raise ValueError("ZeRO with pipeline parallelism is not combined here (train.py refuses --pp with --fsdp)")
    if zero_stage not in (0, 1, 2, 3) or (zero_stage and dp == 1):
        raise ValueError(f"zero_stage {zero_stage}: 0 (plain DP), or 1-3 with more than one data-parallel rank")
    linear = {f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.Linear)}

    def tp_split(name):
        # What tensor_parallel shards: every projection of a block, the embedding and the head
        # (by vocabulary rows); K/V over min(tp, n_kv_head) slots (fewer heads than ranks:
        # replicated); norms and learned positions stay whole on every rank.
        if tp == 1 or "norm" in name or name.startswith("embed_positions"):
            return 1
        return min(tp, c.n_kv_head) if name.split(".")[-2] in ("k_proj", "v_proj") else tp

    # Activations, bytes per token per layer, of the dense GQA block on the GPU path (bf16
    # autocast, the flash kernel), counting what autograd saves for the backward: the two
    # residual-stream inputs of the RMSNorms (float32: weights are, so the residual adds are),
    # 4 + 4 h; the bf16 casts of the normed input, one per projection reading it (q, k, v; gate,
    # up), 5 x 2 h; flash attention's q, k, v and output (the output is also o_proj's input)
    # and its float32 logsumexp per head; SwiGLU's gate, silu(gate), up and their product, 4 x 2
    # mlp_dim. This is Korthikanti et al. 2022's sbh(34 + 5as/h) redone for this code: no
    # dropout masks, no (T x T) attention scores (the flash kernel never keeps them), SwiGLU
    # in place of a 4h GELU MLP, K/V at n_kv_head. Left out: small terms (RoPE's cos/sin,
    # RMSNorm's 1/rms), the backward's own temporaries, the allocator's fragmentation and the
    # CUDA context: what the fit test's headroom is for. MoE, MLA and Mamba-2 layers are
    # counted as if they were this block. Tensor parallelism (without sequence parallelism)
    # splits the heads and mlp_dim; the residual stream and the casts stay whole on every rank.
    h, d, tokens = c.dim, c.head_dim, micro_batch * seq_len
    heads, kv_heads = c.n_head // tp, max(c.n_kv_head // tp, 1)
    per_layer = 18 * h + 4 * heads * d + 4 * kv_heads * d + 4 * heads + 8 * c.mlp_dim // tp
    worst = None
    for s, (lo, hi) in enumerate(split_layers(c.n_layer, pp)):
        # This stage's tensors, each once (a tied matrix is one tensor in one process, two on a
        # pipeline: stage 0's embedding and the last stage's head): elements per GPU after TP.
        held = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            top = name.split(".")[0]
            unit = int(name.split(".")[1]) if top == "layers" else "root"
            if unit == "root" and not (s == 0 if top.startswith("embed") else s == pp - 1):
                continue
            if unit != "root" and not lo <= unit < hi:
                continue
            key = id(p) if pp == 1 else name
            n, unit0, mm = held.get(key, (p.numel() // tp_split(name), unit, False))
            held[key] = (n, unit0, mm or name in linear)
        n = sum(e for e, _, _ in held.values())
        units = {}
        for e, u, _ in held.values():
            units[u] = units.get(u, 0) + e
        root, block = units.get("root", 0), max((e for u, e in units.items() if u != "root"), default=0)
        P, steps = 4 * n, 4 * len(held)
        # ZeRO (parallel.ZeRO, whose memory() states the same): stage 1 shards the optimizer
        # state, 2 the gradients too, 3 the weights too; stages 2 and 3 hold on top the root's
        # (embeddings, final norm, head: reduced last) and one block's full gradients, and
        # stage 3 the root's and one block's gathered weights. Plain DP: DataParallel's flat
        # buckets keep a second copy of every gradient (for the all-reduce). The step counters
        # are one per tensor on every rank. (ZeRO's row padding is left out: a few rows.)
        W = dp if zero_stage else 1
        weights = P / W + 4 * (root + block) if zero_stage == 3 else P
        grads = (P * (2 if dp > 1 else 1) if zero_stage == 0 else P if zero_stage == 1
                 else P / W + 4 * (root + block))
        optimizer = 2 * P / W + steps
        # 1F1B keeps up to pp - s micro-batches in flight on stage s (stage 0: pp of them, of
        # L/pp layers each: about one whole model's activations, as without a pipeline).
        act = min(pp - s, n_micro) * tokens * per_layer * (hi - lo)
        act += 2 * sum(e for e, _, mm in held.values() if mm)          # autocast's bf16 weights
        if s == pp - 1:
            # The head: the final norm's input, and the loss. model.py's ChunkedCrossEntropy
            # keeps dL/dh (float32 per token) and dL/dW (a float32 head-sized matrix) from the
            # forward, with one chunk of ~2^25 bf16 logits alive at a time; the vocabulary-
            # parallel loss keeps h and builds its (tokens x V/tp) float32 logits and their exp.
            V = c.padded_vocab
            act += 8 * h * tokens
            act += (4 * V * h + 2 * min(tokens, max(256, 2 ** 25 // V)) * V if tp == 1
                    else 2 * 4 * tokens * V // tp)
        out = {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": act}
        out["total"] = sum(out.values())
        if worst is None or out["total"] > worst["total"]:
            worst = out
    return worst


# -----------------------------------------------------------------------------
# The tensor-parallel demo

class _MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _tp_demo():
    """`torchrun --nproc_per_node=2 parallel.py tp`: a SwiGLU MLP split column-then-row against
    the whole one, then the SmolLM3 seed bug, caught."""
    tp, rank = _tp(None)
    torch.manual_seed(0)                      # every rank builds the same full MLP and input
    full, x = _MLP(64, 256), torch.randn(8, 64, requires_grad=True)
    y_full = full(x)
    y_full.square().sum().backward()
    dx_full = x.grad.clone()
    x.grad = None
    mlp = _MLP(64, 256)
    mlp.load_state_dict(full.state_dict())
    mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, copy_input=False)
    mlp.up_proj = ColumnParallelLinear(mlp.up_proj, copy_input=False)
    mlp.down_proj = RowParallelLinear(mlp.down_proj)
    _enter_with_f(mlp, None)      # f once on the MLP's input (both gate and up read it); down applies g
    y = mlp(x)
    y.square().sum().backward()
    bad = check_replicas(mlp)
    torch.manual_seed(0)                      # the SmolLM3 bug: shards initialised alike
    for p in mlp.parameters():
        nn.init.normal_(p, std=0.02)
    same_seed = check_replicas(mlp)
    torch.manual_seed(tp_seed(0))             # the fix
    for p in mlp.parameters():
        nn.init.normal_(p, std=0.02)
    fixed = check_replicas(mlp)
    if rank == 0:
        print(f"SwiGLU MLP 64 -> 256 -> 64 over {tp} ranks: column-parallel gate/up, row-parallel down")
        print(f"  |y_tp - y_full| max {(y - y_full).abs().max().item():.2e}, "
              f"|dx_tp - dx_full| max {(x.grad - dx_full).abs().max().item():.2e}  (one all-reduce each way)")
        print(f"  check_replicas after slicing the full matrices: {bad or 'healthy'}")
        print(f"  after initialising every shard from seed 0 on every rank: {len(same_seed)} problems:")
        for name, why in same_seed:
            print(f"    {name}: {why}")
        print(f"  after initialising with tp_seed(0) = 0 + tp_rank: {fixed or 'healthy'}")


def _pp_demo():
    """`python parallel.py pp` (no torchrun): the bubble table and the two schedules drawn."""
    print("bubble = (n-1)/(m+n-1): the idle share of each stage's time\n")
    ms = (1, 4, 8, 16, 32, 64)
    print("stages \\ micro-batches " + "".join(f"{m:>7}" for m in ms))
    for n in (2, 4, 8, 16):
        print(f"{n:>22} " + "".join(f"{bubble_fraction(n, m):>7.0%}" for m in ms))
    n, m = 4, 8
    for schedule in ("gpipe", "1f1b"):
        rows = timeline(schedule, n, m)
        idle = sum(r.count(".") for r in rows) / sum(len(r) for r in rows)
        peak = []
        for s in range(n):                    # most micro-batches forwarded and not yet backwarded
            alive = best = 0
            for op, _ in schedule_ops(schedule, n, s, m):
                alive += 1 if op == "F" else -1
                best = max(best, alive)
            peak.append(best)
        print(f"\n{schedule}: {n} stages, {m} micro-batches (digit i: forward of micro-batch i; letter: its backward, a for 0)")
        for s, r in enumerate(rows):
            print(f"  stage {s}  {r}   activations alive at most: {peak[s]}")
        print(f"  idle {idle:.0%} of the slots; bubble_fraction({n}, {m}) = {bubble_fraction(n, m):.0%}")


class _Stack(nn.Module):
    """A small stand-in for a transformer: an embedding, a stack of MLP blocks, a head."""

    def __init__(self, vocab=512, dim=256, n_layer=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
                                    for _ in range(n_layer))
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        h = self.embed(x)
        for block in self.layers:
            h = h + block(h)
        return self.head(h)


def _zero_demo():
    """`torchrun --nproc_per_node=2 parallel.py zero`: the bytes each rank holds at each ZeRO
    stage after one AdamW step, against the paper's figures."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(rank))
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = _Stack()
        net = ZeRO(model, stage=stage)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss = nn.functional.cross_entropy(net(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        m = net.memory(opt)
        if rank == 0 and stage == 1:
            print(f"{world} ranks, one AdamW step of a {sum(p.nbytes for p in net.params) / 2**20:.1f} MB model "
                  f"(loss {loss.item():.3f}); bytes per rank:")
        if rank == 0:
            mb = lambda b: f"{b / 2**20:6.2f} MB"   # noqa: E731
            e = m["expected"]
            print(f"stage {stage}: params {mb(m['params'])} (paper {mb(e['params'])}), grads at most "
                  f"{mb(m['peak_grads'])} (paper {mb(e['grads'])}), optimizer {mb(m['optimizer'])} "
                  f"(paper {mb(e['optimizer'])}); full weights at most {mb(m['peak_gathered'])} at once")


def _main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else "bench"
    if cmd == "pp":
        _pp_demo()
        return
    if "RANK" not in os.environ:
        raise SystemExit(f"parallel.py {cmd}: run it under torchrun, e.g. torchrun --nproc_per_node=2 parallel.py {cmd}")
    rank, world, device = init()
    if cmd == "bench":
        sizes = [2 ** k for k in range(10, 29 if device.type == "cuda" else 27, 2)]
        rows = bandwidth_table(sizes, device=device)
        if rank == 0:
            print_bandwidth(rows, world, dist.get_backend())
    elif cmd == "zero":
        _zero_demo()
    elif cmd == "tp":
        _tp_demo()
    elif cmd == "health":
        mm, ar, slow = health_check(device)
        if rank == 0:
            for r in range(world):
                print(f"rank {r}: matmul {mm[r] * 1e3:.2f} ms, all-reduce {ar[r] * 1e3:.2f} ms")
            print(f"slow ranks (matmul >= 1.5x the other ranks' median): {slow or 'none'}")
    else:
        raise SystemExit(f"parallel.py: unknown command {cmd!r} (bench, health, zero, tp, pp)")
    dist.destroy_process_group()


if __name__ == "__main__":
    _main()
