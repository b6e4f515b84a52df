"""Demo: train a tiny GPT with tensor parallelism on 2 CPU ranks, save, resume on 1 rank.

1. Two ranks (TP=2, gloo) train for SAVE_AT steps, save model + Adam state, and keep training
   to STEPS: the uninterrupted reference run.
2. One process (TP=1, no torch.distributed) loads the checkpoint into a differently sharded
   model and trains the remaining steps. Its losses must match the reference.

The tensor-parallel layers are written by hand, Megatron-style: attention heads and the MLP's
hidden units are split over TP ranks (column-parallel, then row-parallel with an all-reduce).
"""

import math
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import dist_checkpointing as dc
from dist_checkpointing import ShardedTensor

VOCAB, HIDDEN, HEADS, FFN, LAYERS, SEQ, BATCH = 64, 32, 4, 64, 2, 16, 8
STEPS, SAVE_AT, LR = 12, 6, 1e-2
TOLERANCE = 1e-5  # relative: TP=2 and TP=1 sum in different orders


def _sum_over_tp(x):
    """Sum over the TP ranks (identity at TP=1, where no process group exists)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (input of a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _sum_over_tp(grad)


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward (output of a row-parallel layer)."""

    @staticmethod
    def forward(ctx, x):
        return _sum_over_tp(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


# name -> (global shape, axis split over TP or None if replicated)
def parameter_layout():
    layout = {"embedding.weight": ((VOCAB, HIDDEN), None), "position.weight": ((SEQ, HIDDEN), None)}
    for layer in range(LAYERS):
        p = f"layers.{layer}."
        layout.update(
            {
                p + "ln1.weight": ((HIDDEN,), None),
                p + "ln1.bias": ((HIDDEN,), None),
                p + "q.weight": ((HIDDEN, HIDDEN), 0),  # column-parallel: heads split
                p + "k.weight": ((HIDDEN, HIDDEN), 0),
                p + "v.weight": ((HIDDEN, HIDDEN), 0),
                p + "proj.weight": ((HIDDEN, HIDDEN), 1),  # row-parallel
                p + "proj.bias": ((HIDDEN,), None),
                p + "ln2.weight": ((HIDDEN,), None),
                p + "ln2.bias": ((HIDDEN,), None),
                p + "fc1.weight": ((FFN, HIDDEN), 0),
                p + "fc1.bias": ((FFN,), 0),
                p + "fc2.weight": ((HIDDEN, FFN), 1),
                p + "fc2.bias": ((HIDDEN,), None),
            }
        )
    layout["final_ln.weight"] = ((HIDDEN,), None)
    layout["final_ln.bias"] = ((HIDDEN,), None)
    return layout


class TinyGPT:
    def __init__(self, tp: int, tp_rank: int):
        self.tp, self.tp_rank = tp, tp_rank
        self.layout = parameter_layout()
        generator = torch.Generator().manual_seed(1234)  # same full weights at any TP
        self.params = {}
        for name, (shape, axis) in self.layout.items():
            if name.endswith("ln1.weight") or name.endswith("ln2.weight") or name == "final_ln.weight":
                full = torch.ones(shape)
            elif name.endswith("bias"):
                full = torch.zeros(shape)
            else:
                full = torch.randn(shape, generator=generator) * 0.1
            self.params[name] = self.local(full, axis).clone().requires_grad_()
        self.exp_avg = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.step = 0

    def local(self, full, axis):
        if axis is None:
            return full
        size = full.shape[axis] // self.tp
        return full.narrow(axis, self.tp_rank * size, size)

    def forward(self, tokens):
        P = self.params
        heads = HEADS // self.tp
        x = P["embedding.weight"][tokens] + P["position.weight"]
        causal = torch.full((SEQ, SEQ), float("-inf")).triu(1)
        for layer in range(LAYERS):
            p = f"layers.{layer}."
            h = _CopyToTP.apply(F.layer_norm(x, (HIDDEN,), P[p + "ln1.weight"], P[p + "ln1.bias"]))
            q, k, v = (
                (h @ P[p + n + ".weight"].T).view(BATCH, SEQ, heads, -1).transpose(1, 2)
                for n in ("q", "k", "v")
            )
            scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + causal
            attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(BATCH, SEQ, -1)
            x = x + _ReduceFromTP.apply(attn @ P[p + "proj.weight"].T) + P[p + "proj.bias"]
            h = _CopyToTP.apply(F.layer_norm(x, (HIDDEN,), P[p + "ln2.weight"], P[p + "ln2.bias"]))
            a = F.gelu(h @ P[p + "fc1.weight"].T + P[p + "fc1.bias"])
            x = x + _ReduceFromTP.apply(a @ P[p + "fc2.weight"].T) + P[p + "fc2.bias"]
        x = F.layer_norm(x, (HIDDEN,), P["final_ln.weight"], P["final_ln.bias"])
        return x @ P["embedding.weight"].T

    def train_step(self, step):
        generator = torch.Generator().manual_seed(step)  # the same batch on every rank
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
        logits = self.forward(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        for p in self.params.values():
            p.grad = None
        loss.backward()
        self.step += 1
        with torch.no_grad():  # Adam, by hand: its state is checkpointed like the weights
            for n, p in self.params.items():
                m, v = self.exp_avg[n], self.exp_avg_sq[n]
                m.mul_(0.9).add_(p.grad, alpha=0.1)
                v.mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
                m_hat, v_hat = m / (1 - 0.9**self.step), v / (1 - 0.999**self.step)
                p.sub_(LR * m_hat / (v_hat.sqrt() + 1e-8))
        return loss.item()

    def sharded_state_dict(self):
        """Model and optimizer state, each tensor sharded like its parameter."""
        dp_rank = 0

        def wrap(key, tensor, axis):
            if axis is None:  # replicated: TP rank 0 holds the main replica
                return ShardedTensor.from_rank_offsets(key, tensor, replica_id=self.tp_rank)
            return ShardedTensor.from_rank_offsets(key, tensor, (axis, self.tp_rank, self.tp), replica_id=dp_rank)

        state = {"model": {}, "optimizer": {"exp_avg": {}, "exp_avg_sq": {}}, "step": self.step}
        for name, (_, axis) in self.layout.items():
            state["model"][name] = wrap(name, self.params[name].detach(), axis)
            state["optimizer"]["exp_avg"][name] = wrap(f"optimizer.exp_avg.{name}", self.exp_avg[name], axis)
            state["optimizer"]["exp_avg_sq"][name] = wrap(f"optimizer.exp_avg_sq.{name}", self.exp_avg_sq[name], axis)
        return state

    def load_state(self, loaded):
        with torch.no_grad():
            for name in self.layout:
                self.params[name].copy_(loaded["model"][name])
                self.exp_avg[name].copy_(loaded["optimizer"]["exp_avg"][name])
                self.exp_avg_sq[name].copy_(loaded["optimizer"]["exp_avg_sq"][name])
        self.step = loaded["step"]


def reference_run(rank, world_size, port, checkpoint_dir, results):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    model = TinyGPT(tp=world_size, tp_rank=rank)
    losses = [model.train_step(step) for step in range(SAVE_AT)]
    dist.barrier()
    start = time.perf_counter()
    dc.save(model.sharded_state_dict(), checkpoint_dir)
    save_seconds = time.perf_counter() - start
    losses += [model.train_step(step) for step in range(SAVE_AT, STEPS)]
    if rank == 0:
        results.put((losses, save_seconds))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(checkpoint_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(checkpoint_dir) for f in fs]
    size = sum(os.path.getsize(f) for f in files)
    keys = dc.load_tensors_metadata(checkpoint_dir)
    print(f"checkpoint: {checkpoint_dir}")
    print(f"  {len(keys)} tensors, {len(files)} files, {size / 1024:.1f} KiB on disk")
    for name in ("metadata.json", "common.pt", "embedding.weight/zarr.json", "layers.0.q.weight/c/1/0"):
        print(f"  {name}{'' if os.path.exists(os.path.join(checkpoint_dir, name)) else ' (missing!)'}")


def main():
    checkpoint_dir = os.path.join(tempfile.mkdtemp(prefix="dist_ckpt_demo_"), "iter_%07d" % SAVE_AT)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    print(f"[TP=2] training {STEPS} steps on 2 ranks, saving after step {SAVE_AT} ...")
    mp.start_processes(
        reference_run, args=(2, free_port(), checkpoint_dir, results), nprocs=2, start_method="spawn"
    )
    reference, save_seconds = results.get(timeout=60)
    print(f"[TP=2] save took {save_seconds:.3f} s")
    describe(checkpoint_dir)

    print("[TP=1] resuming in one process (no torch.distributed) ...")
    model = TinyGPT(tp=1, tp_rank=0)
    start = time.perf_counter()
    request = model.sharded_state_dict()  # the TP=1 layout asks for whole tensors
    model.load_state(dc.load(request, checkpoint_dir))
    print(f"[TP=1] load took {time.perf_counter() - start:.3f} s, resuming at step {model.step}")
    resumed = [model.train_step(step) for step in range(SAVE_AT, STEPS)]

    print(f"{'step':>4} {'TP=2 uninterrupted':>20} {'TP=1 resumed':>14}")
    worst = 0.0
    for step in range(STEPS):
        other = resumed[step - SAVE_AT] if step >= SAVE_AT else None
        if other is not None:
            worst = max(worst, abs(other - reference[step]) / abs(reference[step]))
        print(f"{step:>4} {reference[step]:>20.6f} {'' if other is None else f'{other:>14.6f}'}")
    ok = worst <= TOLERANCE
    print(f"max relative loss difference after resume: {worst:.2e} (tolerance {TOLERANCE:.0e}): {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
