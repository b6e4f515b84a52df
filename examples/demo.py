"""`make demo`: the job this library is for, on 4 CPU ranks.

1. A tiny GPT (tinygpt.py) trains at TP=2 x DP=2 with a distributed optimizer, whose Adam state
   is saved as flattened shards, on two simulated nodes of two ranks. A CheckpointManager
   saves every step to node memory (a memory tier: each node's own directory under /dev/shm,
   replicated to the other node) and asynchronously every SAVE_EVERY steps to disk, keeping
   the newest KEEP_LATEST. Right after the save of step KILL_AT is scheduled, rank 1 is killed
   with SIGKILL while that save is in flight, and the launcher stops the other ranks, as
   torchrun or Slurm do when a rank dies. Node 0 is lost with it: its memory directory goes.
2. The job restarts at TP=1 x DP=4. The manager finds the newest step either tier can restore
   (the killed save never committed to disk; node 0's pieces of the memory steps live on in
   node 1's replicas), loads it resharded, and training goes on to STEPS, saving as before.
   For comparison it also times a load of the newest step on disk.
3. The uninterrupted run at TP=2 x DP=2, on the same ranks: the resumed losses must match it.

It prints what was saved, and writes loss.png (the loss curves) and summary.json (what
tests/test_demo.py checks) to the output directory.
"""

import argparse
import json
import logging
import os
import re
import shutil
import signal
import statistics
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tinygpt import TinyGPT

from dist_checkpointing import CheckpointManager, MemoryTier, check_is_distributed_checkpoint, load
from dist_checkpointing.manager import step_dir_name
from dist_checkpointing.storage import storage_of

WORLD = 4
FIRST, RESUMED = (2, 1, 2), (1, 1, 4)  # (TP, PP, DP)
STEPS, SAVE_EVERY, KEEP_LATEST = 18, 3, 2
KILL_AT, KILLED_RANK = 12, 1
RANKS_PER_NODE, LOST_NODE = 2, 0  # the killed rank's node
TOLERANCE = 1e-5  # relative: TP=1 x DP=4 sums in another order than TP=2 x DP=2
JOB_TIMEOUT_S = 120


def layout_name(layout):
    tp, _, dp = layout
    return f"TP={tp} x DP={dp}"


# --- the training job (runs on every rank) ------------------------------------------------
def train(model, steps, report, run, manager=None, kill_at=None):
    """Trains `steps`; rank 0 reports each loss and how long each save (to memory every step,
    to disk every SAVE_EVERY) held training up."""
    for step in steps:
        loss = model.train_step(step)
        done = step + 1
        report("loss", run, done, loss)
        if manager is not None:
            start = time.perf_counter()
            manager.save(done, model.sharded_state_dict())
            report("save", run, done, time.perf_counter() - start)
            if done == kill_at and dist.get_rank() == KILLED_RANK:
                os.kill(os.getpid(), signal.SIGKILL)  # its async save is in flight


def node_memory(memory_root, rank):
    return os.path.join(memory_root, f"node{rank // RANKS_PER_NODE}")


def managed(root, memory_root):
    """The manager of both jobs: to disk every SAVE_EVERY steps, to node memory every step."""
    tier = MemoryTier(node_memory(memory_root, dist.get_rank()), every=1, replicas=1, ranks_per_node=RANKS_PER_NODE)
    return CheckpointManager(root, keep_latest=KEEP_LATEST, async_save=True, persistent_every=SAVE_EVERY, memory=tier)


def interrupted_run(report, root, memory_root):
    model = TinyGPT(*FIRST)
    manager = managed(root, memory_root)
    train(model, range(STEPS), report, "interrupted", manager, kill_at=KILL_AT)
    manager.close()  # not reached: rank 1 is killed at KILL_AT


def restarted_and_uninterrupted_runs(report, root, memory_root):
    manager = managed(root, memory_root)
    on_disk_step = manager.latest_step()
    model = TinyGPT(*RESUMED)
    start = time.perf_counter()
    model.load_state_dict(manager.load(model.sharded_state_dict()))
    step = model.optimizer.step_count
    report("resumed", step, time.perf_counter() - start, manager.restored_from)
    start = time.perf_counter()  # the same state from the newest step on disk, for comparison
    load(TinyGPT(*RESUMED).sharded_state_dict(), manager.path(on_disk_step))
    report("disk load", on_disk_step, time.perf_counter() - start)
    train(model, range(step, STEPS), report, "resumed", manager)
    start = time.perf_counter()
    manager.wait()  # the last save commits
    report("committed", STEPS, time.perf_counter() - start)
    manager.close()
    train(TinyGPT(*FIRST), range(STEPS), report, "uninterrupted")


# --- the launcher ---------------------------------------------------------------------------
def _rank_main(fn, rank, port, messages, args):
    os.setpgrp()  # this rank and its checkpoint writer: one process group for the launcher to stop
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))  # the ranks share the CPUs
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"      rank {rank}: %(message)s"))
    logging.getLogger("dist_checkpointing.manager").addHandler(handler)
    logging.getLogger("dist_checkpointing.manager").setLevel(logging.INFO)
    try:
        store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=False, timeout=timedelta(seconds=30))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
        fn(lambda *message: messages.put(message) if rank == 0 else None, *args)
        dist.destroy_process_group()
    except BaseException:
        messages.put(("error", rank, traceback.format_exc()))
        sys.exit(1)


def launch(fn, *args):
    """Runs `fn(report, *args)` on WORLD ranks; returns rank 0's reports and every rank's exit
    code. When a rank fails or dies, the whole job is stopped (SIGKILL to every rank's group)."""
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    messages = ctx.SimpleQueue()  # put() writes through at once: a report survives a later kill
    ranks = [ctx.Process(target=_rank_main, args=(fn, r, store.port, messages, args)) for r in range(WORLD)]
    for p in ranks:
        p.start()
    received, deadline = [], time.monotonic() + JOB_TIMEOUT_S
    while any(p.exitcode is None for p in ranks):
        while not messages.empty():
            received.append(messages.get())
        if any(p.exitcode for p in ranks) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    for p in ranks:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group has exited
            pass
        p.join()
    while not messages.empty():
        received.append(messages.get())
    return received, [p.exitcode for p in ranks]


def failures(received):
    return {rank: trace for kind, rank, trace, *_ in received if kind == "error"}


def fail_on_errors(received):
    if failures(received):
        raise SystemExit("".join(f"rank {rank} failed:\n{trace}" for rank, trace in failures(received).items()))


# --- what is on disk ------------------------------------------------------------------------
def on_disk(path):
    """(complete, files, bytes) of a step directory."""
    sizes = storage_of(path).files(path)
    return check_is_distributed_checkpoint(path), len(sizes), sum(sizes.values())


def step_dirs(root):
    """step -> `on_disk` of its directory, for every step directory: complete or not, as the
    crash left them (a manager opening the root would remove some)."""
    names = sorted(name for name in os.listdir(root) if name.startswith("iter_"))
    return {int(name[len("iter_"):]): on_disk(os.path.join(root, name)) for name in names}


def losses_of(messages, run):
    return {step: loss for kind, *rest in messages if kind == "loss" and rest[0] == run for step, loss in [rest[1:]]}


def plot(path, reference, interrupted, resumed, resumed_from, restored_from, timings):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    ax.plot(list(reference), list(reference.values()), color="0.75", linewidth=6,
            label=f"uninterrupted, {layout_name(FIRST)}")
    ax.plot(list(interrupted), list(interrupted.values()), "o-", color="tab:blue", markersize=4,
            label=f"killed run, {layout_name(FIRST)}")
    restore_s, disk_step, disk_s = timings
    ax.plot(list(resumed), list(resumed.values()), "s--", color="tab:orange", markersize=4,
            label=f"resumed from {restored_from} step {resumed_from} ({restore_s:.2f} s), {layout_name(RESUMED)}")
    ax.plot([], [], " ", label=f"(newest step on disk: {disk_step}, loads in {disk_s:.2f} s)")
    ax.axvline(KILL_AT, color="tab:red", linestyle=":")
    ax.annotate(f"rank {KILLED_RANK} SIGKILLed, node {LOST_NODE} lost,\nsave of step {KILL_AT} in flight", (KILL_AT, max(reference.values())),
                xytext=(6, -4), textcoords="offset points", va="top", color="tab:red", fontsize=8)
    ax.set_xticks(range(0, STEPS + 1, SAVE_EVERY))
    ax.set_xlabel(f"step (to memory every step, to disk every {SAVE_EVERY})")
    ax.set_ylabel("loss")
    ax.set_title("A node lost mid-save, resumed from peer memory at another layout")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="demo_output", help="where the checkpoints, loss.png and summary.json go")
    output = parser.parse_args(argv).output
    # The ranks killed on purpose never unregister their semaphores; the tracker frees them.
    sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    root = os.path.join(output, "checkpoints")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(output, exist_ok=True)
    memory_root = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else output, f"dist_ckpt_demo_{os.getpid()}")
    try:
        return run(output, root, memory_root)
    finally:
        shutil.rmtree(memory_root, ignore_errors=True)


def run(output, root, memory_root):
    print(f"[1/3] Training a tiny GPT at {layout_name(FIRST)} on {WORLD} ranks (2 nodes of {RANKS_PER_NODE}), distributed optimizer;")
    print(f"      every step saved to node memory ({memory_root}/node<n>, replicated to the other node),")
    print(f"      every {SAVE_EVERY} steps saved asynchronously to {root} (keep_latest={KEEP_LATEST})", flush=True)
    first, exit_codes = launch(interrupted_run, root, memory_root)
    if exit_codes[KILLED_RANK] != -signal.SIGKILL:
        fail_on_errors(first)
        raise SystemExit(f"rank {KILLED_RANK} was not killed: exit codes {exit_codes}")
    at_kill = step_dirs(root)
    print(f"      rank {KILLED_RANK} killed (SIGKILL) right after the async save of step {KILL_AT} was scheduled;")
    lost = sorted(failures(first))
    if lost:  # the others' next collective finds the dead peer
        reason = re.search(r"Connection[\w ]+|Read error|Timed out", failures(first)[lost[0]])
        print(f"      rank{'s' * (len(lost) > 1)} {', '.join(map(str, lost))}: the next collective failed"
              f" ({reason.group(0).strip() if reason else 'see the log'})")
    print("      the launcher stopped the job. On disk:")
    for step, (complete, files, size) in at_kill.items():
        state = "complete" if complete else "no metadata.json: incomplete, ignored"
        print(f"        {step_dir_name(step)}: {files:3d} files, {size / 1024:6.1f} KiB, {state}")
    shutil.rmtree(node_memory(memory_root, KILLED_RANK))
    print(f"      node {LOST_NODE} (ranks {LOST_NODE * RANKS_PER_NODE}-{(LOST_NODE + 1) * RANKS_PER_NODE - 1}) is lost with its memory:"
          f" {node_memory(memory_root, KILLED_RANK)} deleted")

    print(f"[2/3] Restarting at {layout_name(RESUMED)}, then [3/3] the uninterrupted run at {layout_name(FIRST)}", flush=True)
    second, _ = launch(restarted_and_uninterrupted_runs, root, memory_root)
    fail_on_errors(second)
    ((_, resumed_from, load_s, restored_from),) = [m for m in second if m[0] == "resumed"]
    ((_, disk_step, disk_s),) = [m for m in second if m[0] == "disk load"]
    ((_, _, commit_s),) = [m for m in second if m[0] == "committed"]
    print(f"      resumed from step {resumed_from}, restored from the {restored_from} tier in {load_s:.2f} s"
          f" (node {LOST_NODE}'s pieces from node {1 - LOST_NODE}'s replicas);")
    print(f"      the newest step on disk, {disk_step}, loads in {disk_s:.2f} s")

    reference, resumed = losses_of(second, "uninterrupted"), losses_of(second, "resumed")
    interrupted = losses_of(first, "interrupted")
    print(f"\n{'step':>4} {'uninterrupted':>14} {'killed run':>11} {'resumed':>10}")
    for step, loss in reference.items():
        cells = [f"{runs[step]:>{width}.6f}" if step in runs else " " * width for runs, width in ((interrupted, 11), (resumed, 10))]
        print(f"{step:>4} {loss:>14.6f} {cells[0]} {cells[1]}")
    worst = max(abs(runs[s] - reference[s]) / abs(reference[s]) for runs in (interrupted, resumed) for s in runs)

    manager = CheckpointManager(root)
    kept = manager.steps()
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
        tracker = f.read().strip()
    print(f"\nSaved under {root}: steps kept {kept} (keep_latest={KEEP_LATEST}); tracker file says {tracker}")
    for step in kept:
        _, files, size = on_disk(manager.path(step))
        print(f"  {step_dir_name(step)}: {files} files, {size / 1024:.1f} KiB")
    to_disk = [m[3] for m in first + second if m[0] == "save" and m[2] % SAVE_EVERY == 0]
    to_memory = [m[3] for m in first + second if m[0] == "save" and m[2] % SAVE_EVERY]
    (last_blocked,) = [m[3] for m in second if m[0] == "save" and m[2] == STEPS]
    _, _, last_bytes = on_disk(manager.path(STEPS))
    total_s = last_blocked + commit_s
    print(f"  {len(to_memory)} saves to memory held training up for {statistics.median(to_memory):.3f} s each (median),"
          f" {len(to_disk)} to memory and disk {statistics.median(to_disk):.3f} s;")
    print(f"  step {STEPS}: {last_bytes / 1e6:.2f} MB committed {total_s:.2f} s after its save began,"
          f" {last_bytes / total_s / 1e9:.4f} GB/s (a tiny model: fixed costs dominate)")

    png = os.path.join(output, "loss.png")
    plot(png, reference, interrupted, resumed, resumed_from, restored_from, (load_s, disk_step, disk_s))
    summary = {
        "killed_rank_exit_code": exit_codes[KILLED_RANK],
        "steps_at_kill": {str(step): complete for step, (complete, _, _) in at_kill.items()},
        "resumed_from": resumed_from,
        "restored_from": restored_from,
        "restore_s": load_s,
        "disk_step": disk_step,
        "disk_load_s": disk_s,
        "losses": {"uninterrupted": reference, "interrupted": interrupted, "resumed": resumed},
        "kept": kept,
        "tracker": tracker,
        "max_relative_difference": worst,
    }
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    ok = worst <= TOLERANCE and set(resumed) == set(range(resumed_from + 1, STEPS + 1))
    print(f"\nLoss curves: {png}")
    print(f"Max relative loss difference from the uninterrupted run: {worst:.1e} (tolerance {TOLERANCE:.0e}):"
          f" {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
