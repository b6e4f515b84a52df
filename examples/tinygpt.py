"""A tiny GPT trained with tensor, pipeline and data parallelism and a distributed optimizer,
written by hand the way Megatron-LM does it: the demo's model (demo.py), and the tests' proof
that checkpoints reshard training state (tests/test_end_to_end.py).

- TP: q/k/v and fc1 are column-parallel (output rows split), proj and fc2 row-parallel (input
  columns split, outputs all-reduced); layer norms, biases after a reduction, embeddings and
  the head are replicated over TP.
- PP: stage s runs layers [s*L/PP, (s+1)*L/PP); activations and their gradients travel by
  send/recv. The first stage embeds, the last one holds the final norm and the head.
- DP: each DP rank gets its slice of the global batch; gradients are summed over DP.
- Distributed optimizer: the local parameters of a (TP, PP) rank are laid end to end in one flat
  buffer and DP rank d owns the d-th of DP contiguous ranges: it keeps the fp32 master weights
  and Adam moments of that range only, updates it, and the DP ranks all-gather the new weights.
  Those ranges cut parameters at arbitrary elements: their state is saved as flattened shards.

The MLP is a SwiGLU whose fused fc1 shard is checkpointed through a ShardedTensorFactory
(swiglu_factory), for the weights and for their flattened optimizer state.

Layer weights are stacked Megatron-style: key `layers.q.weight` of global shape (LAYERS, ...)
with one ShardedTensor per local layer (prepend_axis_num=1), so PP changes which rank holds
which layer.

rank = (pp_rank * DP + dp_rank) * TP + tp_rank.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dist_checkpointing as dc
from dist_checkpointing import ShardedTensor, ShardedTensorFactory
from dist_checkpointing.optimizer import make_sharded_optimizer_tensor

VOCAB, HIDDEN, HEADS, FFN, LAYERS, SEQ, BATCH = 32, 16, 4, 32, 4, 8, 8
LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8

# name -> (shape without the layer axis, TP axis or None); stacked over layers unless global
LAYER_PARAMS = {
    "ln1.weight": ((HIDDEN,), None),
    "ln1.bias": ((HIDDEN,), None),
    "q.weight": ((HIDDEN, HIDDEN), 0),
    "k.weight": ((HIDDEN, HIDDEN), 0),
    "v.weight": ((HIDDEN, HIDDEN), 0),
    "proj.weight": ((HIDDEN, HIDDEN), 1),
    "proj.bias": ((HIDDEN,), None),
    "ln2.weight": ((HIDDEN,), None),
    "ln2.bias": ((HIDDEN,), None),
    "fc1.weight": ((2 * FFN, HIDDEN), 0),  # SwiGLU: gate and up fused, see swiglu_factory
    "fc1.bias": ((2 * FFN,), 0),
    "fc2.weight": ((HIDDEN, FFN), 1),
    "fc2.bias": ((HIDDEN,), None),
}
FIRST_STAGE_PARAMS = {"embedding.weight": ((VOCAB, HIDDEN), None), "position.weight": ((SEQ, HIDDEN), None)}
LAST_STAGE_PARAMS = {
    "final_ln.weight": ((HIDDEN,), None),
    "final_ln.bias": ((HIDDEN,), None),
    "head.weight": ((VOCAB, HIDDEN), None),
}


def initial_value(name, shape):
    """The same full initial weights at any layout (fc1: gates of all TP ranks, then ups)."""
    if name.endswith("ln1.weight") or name.endswith("ln2.weight") or name == "final_ln.weight":
        return torch.ones(shape)
    if name.endswith("bias"):
        return torch.zeros(shape)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(shape, generator=g) * 0.2


def batch(step):
    """The global batch of `step`: arithmetic sequences mod VOCAB with a random start and
    stride per row, something to learn (the next token follows from the two before it)."""
    g = torch.Generator().manual_seed(step)
    start, stride = torch.randint(0, VOCAB, (BATCH, 1), generator=g), torch.randint(1, 4, (BATCH, 1), generator=g)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


def local_shard(name, full, axis, tp, tp_rank):
    if axis is None:
        return full
    halves = torch.chunk(full, 2) if ".fc1." in name else [full]  # fc1: [its gates; its ups]
    return torch.cat([h.narrow(axis, tp_rank * h.shape[axis] // tp, h.shape[axis] // tp) for h in halves])


def swiglu_factory(sh: ShardedTensor):
    """Checkpoints a fused SwiGLU fc1 shard `[gate; up]` as two keys, `<key>.gate` and `<key>.up`:
    the fused local layout depends on TP, the two halves do not. Handles flattened ranges (the
    distributed optimizer's state), which may fall in either half or both."""
    axis = sh.prepend_axis_num  # the split axis, fc1's first local axis
    half_shape = (sh.local_shape[0] // 2,) + sh.local_shape[1:]
    half_numel = math.prod(half_shape)
    offsets = [(a, sh.global_offset[a], sh.global_shape[a]) for a in range(sh.prepend_axis_num)]
    tp_offset = (axis, sh.global_offset[axis] // sh.local_shape[0], sh.axis_fragmentations[axis])

    def build(key, data, replica_id, flattened_range):
        kwargs = dict(replica_id=replica_id, prepend_axis_num=sh.prepend_axis_num)
        if flattened_range is None:
            gate, up = torch.chunk(data, 2)
            return {
                "gate": ShardedTensor.from_rank_offsets(f"{key}.gate", gate, *offsets, tp_offset, **kwargs),
                "up": ShardedTensor.from_rank_offsets(f"{key}.up", up, *offsets, tp_offset, **kwargs),
            }
        result, start, stop = {}, flattened_range.start, flattened_range.stop
        for name, lo in (("gate", 0), ("up", half_numel)):
            a, b = max(start, lo), min(stop, lo + half_numel)
            if a < b:
                result[name] = ShardedTensor.from_rank_offsets_flat(
                    f"{key}.{name}", data[a - start : b - start], half_shape, *offsets, tp_offset,
                    flattened_range=slice(a - lo, b - lo), **kwargs,
                )
        return result

    def merge(loaded):
        return torch.cat([loaded[name] for name in ("gate", "up") if name in loaded])

    return ShardedTensorFactory(sh.key, sh.data, build, merge, sh.replica_id, sh.flattened_range)


class Parallel:
    """This rank's place in the TP x PP x DP grid and its process groups."""

    def __init__(self, tp, pp, dp):
        self.tp, self.pp, self.dp = tp, pp, dp
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.tp_rank, self.dp_rank, self.pp_rank = rank % tp, rank // tp % dp, rank // (tp * dp)
        self.tp_group = self.dp_group = None
        if dist.is_initialized():
            assert dist.get_world_size() == tp * pp * dp
            for p in range(pp):  # every rank creates every group, in the same order
                for d in range(dp):
                    group = dist.new_group([(p * dp + d) * tp + t for t in range(tp)])
                    if (p, d) == (self.pp_rank, self.dp_rank):
                        self.tp_group = group
                for t in range(tp):
                    group = dist.new_group([(p * dp + d) * tp + t for d in range(dp)])
                    if (p, t) == (self.pp_rank, self.tp_rank):
                        self.dp_group = group

    def stage_rank(self, pp_rank):
        return (pp_rank * self.dp + self.dp_rank) * self.tp + self.tp_rank

    @property
    def first_stage(self):
        return self.pp_rank == 0

    @property
    def last_stage(self):
        return self.pp_rank == self.pp - 1


def all_reduce(x, group, size):
    if size > 1:
        dist.all_reduce(x, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    """Identity forward; gradient summed over TP (input of a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x, par):
        ctx.par = par
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(), ctx.par.tp_group, ctx.par.tp), None


class _ReduceFromTP(torch.autograd.Function):
    """Sum over TP forward (output of a row-parallel layer); identity backward."""

    @staticmethod
    def forward(ctx, x, par):
        return all_reduce(x.clone(), par.tp_group, par.tp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class TinyGPT:
    def __init__(self, tp=1, pp=1, dp=1):
        self.par = par = Parallel(tp, pp, dp)
        per_stage = LAYERS // pp
        self.layers = range(par.pp_rank * per_stage, (par.pp_rank + 1) * per_stage)
        self.params = {}  # name -> (local tensor, key, TP axis, layer or None)
        specs = dict(FIRST_STAGE_PARAMS) if par.first_stage else {}
        for layer in self.layers:
            specs.update({f"layers.{layer}.{n}": spec for n, spec in LAYER_PARAMS.items()})
        if par.last_stage:
            specs.update(LAST_STAGE_PARAMS)
        for name, (shape, axis) in specs.items():
            local = local_shard(name, initial_value(name, shape), axis, tp, par.tp_rank)
            self.params[name] = local.clone().requires_grad_()
        self.optimizer = DistributedAdam(self)

    def spec(self, name):
        """(key, shape, TP axis, layer) of a parameter."""
        if name.startswith("layers."):
            _, layer, short = name.split(".", 2)
            shape, axis = LAYER_PARAMS[short]
            return f"layers.{short}", shape, axis, int(layer)
        shape, axis = {**FIRST_STAGE_PARAMS, **LAST_STAGE_PARAMS}[name]
        return name, shape, axis, None

    # --- training -------------------------------------------------------------------------
    def stage_forward(self, x):
        P, par = self.params, self.par
        if par.first_stage:
            x = P["embedding.weight"][x] + P["position.weight"]
        heads = HEADS // par.tp
        causal = torch.full((SEQ, SEQ), float("-inf")).triu(1)
        for layer in self.layers:
            p = f"layers.{layer}."
            h = _CopyToTP.apply(F.layer_norm(x, (HIDDEN,), P[p + "ln1.weight"], P[p + "ln1.bias"]), par)
            q, k, v = ((h @ P[p + n + ".weight"].T).unflatten(-1, (heads, -1)).transpose(1, 2) for n in "qkv")
            scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + causal
            attn = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
            x = x + _ReduceFromTP.apply(attn @ P[p + "proj.weight"].T, par) + P[p + "proj.bias"]
            h = _CopyToTP.apply(F.layer_norm(x, (HIDDEN,), P[p + "ln2.weight"], P[p + "ln2.bias"]), par)
            gate, up = torch.chunk(h @ P[p + "fc1.weight"].T + P[p + "fc1.bias"], 2, dim=-1)
            a = F.silu(gate) * up
            x = x + _ReduceFromTP.apply(a @ P[p + "fc2.weight"].T, par) + P[p + "fc2.bias"]
        if par.last_stage:
            x = F.layer_norm(x, (HIDDEN,), P["final_ln.weight"], P["final_ln.bias"])
            x = x @ P["head.weight"].T
        return x

    def train_step(self, step):
        """One step on the global batch of `step`; returns the loss on the last stage, else None."""
        par = self.par
        tokens = batch(step)
        rows = BATCH // par.dp
        tokens = tokens[par.dp_rank * rows : (par.dp_rank + 1) * rows]
        for p in self.params.values():
            p.grad = None
        if par.first_stage:
            x = tokens[:, :-1]
        else:
            x = torch.empty(rows, SEQ, HIDDEN)
            dist.recv(x, par.stage_rank(par.pp_rank - 1))
            x.requires_grad_()
        out = self.stage_forward(x)
        loss = None
        if par.last_stage:
            local = F.cross_entropy(out.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="sum") / (BATCH * SEQ)
            local.backward()
            loss = all_reduce(local.detach().clone(), par.dp_group, par.dp).item()
        else:
            dist.send(out.detach().contiguous(), par.stage_rank(par.pp_rank + 1))
            grad = torch.empty_like(out)
            dist.recv(grad, par.stage_rank(par.pp_rank + 1))
            out.backward(grad)
        if not par.first_stage:
            dist.send(x.grad.contiguous(), par.stage_rank(par.pp_rank - 1))
        self.optimizer.step()
        return loss

    # --- checkpointing --------------------------------------------------------------------
    def model_sharded_state_dict(self):
        return {name: self.sharded_param(name, p.detach()) for name, p in self.params.items()}

    def sharded_param(self, name, data, replica_dp=None):
        """`data` sharded like parameter `name`; replica id (TP replica, DP rank)."""
        par = self.par
        key, shape, axis, layer = self.spec(name)
        offsets = [] if layer is None else [(0, layer, LAYERS)]
        if axis is not None:
            offsets.append((axis + len(offsets), par.tp_rank, par.tp))
        replica_id = (par.tp_rank if axis is None else 0, par.dp_rank if replica_dp is None else replica_dp)
        sh = ShardedTensor.from_rank_offsets(
            key, data, *offsets, replica_id=replica_id, prepend_axis_num=0 if layer is None else 1
        )
        return swiglu_factory(sh) if key.startswith("layers.fc1.") else sh

    def sharded_state_dict(self):
        return {
            "model": self.model_sharded_state_dict(),
            "optimizer": self.optimizer.sharded_state_dict(),
        }

    def load_state_dict(self, loaded):
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(loaded["model"][name])
        self.optimizer.load_state_dict(loaded["optimizer"])


class DistributedAdam:
    """Adam over this DP rank's range of the flat buffer of the local parameters."""

    def __init__(self, model):
        self.model, self.par = model, model.par
        self.names = list(model.params)
        sizes = [model.params[n].numel() for n in self.names]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        total = sum(sizes)
        self.lo, self.hi = total * self.par.dp_rank // self.par.dp, total * (self.par.dp_rank + 1) // self.par.dp
        self.total = total
        flat = torch.cat([model.params[n].detach().reshape(-1) for n in self.names])
        self.state = {
            "fp32_param": flat[self.lo : self.hi].clone(),
            "exp_avg": torch.zeros(self.hi - self.lo),
            "exp_avg_sq": torch.zeros(self.hi - self.lo),
        }
        self.step_count = 0

    def ranges(self):
        """(name, start, stop in the parameter's flat local shard, start in this rank's range)."""
        for name, offset in zip(self.names, self.offsets):
            numel = self.model.params[name].numel()
            start, stop = max(self.lo - offset, 0), min(self.hi - offset, numel)
            if start < stop:
                yield name, start, stop, offset + start - self.lo

    def step(self):
        par, params = self.par, self.model.params
        grads = torch.cat([params[n].grad.reshape(-1) for n in self.names])
        grads = all_reduce(grads, par.dp_group, par.dp)[self.lo : self.hi]
        self.step_count += 1
        m, v, w = self.state["exp_avg"], self.state["exp_avg_sq"], self.state["fp32_param"]
        m.mul_(BETAS[0]).add_(grads, alpha=1 - BETAS[0])
        v.mul_(BETAS[1]).addcmul_(grads, grads, value=1 - BETAS[1])
        m_hat, v_hat = m / (1 - BETAS[0] ** self.step_count), v / (1 - BETAS[1] ** self.step_count)
        w.sub_(LR * m_hat / (v_hat.sqrt() + EPS))
        flat = torch.zeros(self.total)  # all-gather of the updated ranges, as a sum with zeros
        flat[self.lo : self.hi] = w
        flat = all_reduce(flat, par.dp_group, par.dp)
        with torch.no_grad():
            for name, offset in zip(self.names, self.offsets):
                p = params[name]
                p.copy_(flat[offset : offset + p.numel()].view_as(p))

    def sharded_state_dict(self):
        """Flattened shards of every state tensor; each DP rank holds its own ranges (DP
        replica 0), TP-replicated parameters keep their TP replica id."""
        state = {}
        for name, start, stop, at in self.ranges():
            param = self.model.sharded_param(name, self.model.params[name].detach(), replica_dp=0)
            for state_name, values in self.state.items():
                state.setdefault(state_name, {})[name] = make_sharded_optimizer_tensor(
                    param,
                    values[at : at + stop - start],
                    f"optimizer.state.{state_name}",
                    flattened_range=slice(start, stop),
                )
        return {"state": state, "step": self.step_count}

    def load_state_dict(self, loaded):
        for state_name, values in self.state.items():
            for name, start, stop, at in self.ranges():
                values[at : at + stop - start] = loaded["state"][state_name][name]
        self.step_count = loaded["step"]


def train(model, steps, save_at=None, save_dirs=()):
    """Losses of `steps` (None off the last stage); the state is saved to every dir in
    `save_dirs` (each a (dir, engine) pair) after step `save_at`."""
    losses = []
    for step in steps:
        losses.append(model.train_step(step))
        if step == save_at:
            for ckpt_dir, engine in save_dirs:
                dc.save(model.sharded_state_dict(), ckpt_dir, sharded_strategy=engine)
    return losses
