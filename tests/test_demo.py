"""`make demo` end to end: a job at TP=2 x DP=2 on two simulated nodes, saving to node memory
every step and to disk every 3, whose rank 1 is SIGKILLed while an async save is in flight and
whose node 0 is lost with its memory, restarts at TP=1 x DP=4 from the newest memory step (node
0's pieces from node 1's replicas), and its losses match the uninterrupted run's; retention,
the tracker file, the plot."""

import json
import os
import signal
import subprocess
import sys

import dist_checkpointing as dc

DEMO = os.path.join(os.path.dirname(__file__), "..", "examples", "demo.py")


def test_demo_node_lost_mid_save_resumes_from_peer_memory_at_another_layout(tmp_path):
    result = subprocess.run([sys.executable, DEMO, "--output", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout.splitlines()[-1] and "Warning" not in result.stderr
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)

    assert summary["killed_rank_exit_code"] == -signal.SIGKILL
    at_kill = summary["steps_at_kill"]
    assert at_kill["6"] and at_kill["9"] and not at_kill.get("12", False)  # 12 was in flight
    assert [step for step, complete in at_kill.items() if complete] == ["6", "9"]  # keep_latest=2
    # memory step 12 is complete if its replication finished before the kill, else step 11 is
    resumed_from = summary["resumed_from"]
    assert resumed_from in (11, 12) and summary["restored_from"] == "memory" and summary["disk_step"] == 9
    assert summary["restore_s"] > 0 and summary["disk_load_s"] > 0

    losses = {run: {int(step): loss for step, loss in by_step.items()} for run, by_step in summary["losses"].items()}
    reference = losses["uninterrupted"]
    assert sorted(reference) == list(range(1, 19)) and reference[18] < reference[1] - 0.3  # it learns
    assert sorted(losses["interrupted"]) == list(range(1, 13))
    assert sorted(losses["resumed"]) == list(range(resumed_from + 1, 19))
    for run in ("interrupted", "resumed"):
        for step, loss in losses[run].items():
            assert abs(loss - reference[step]) <= 1e-5 * abs(reference[step]), (run, step)

    root = tmp_path / "checkpoints"
    assert summary["kept"] == [15, 18] and summary["tracker"] == "18"
    assert sorted(os.listdir(root)) == ["iter_0000015", "iter_0000018", "latest_checkpointed_iteration.txt"]
    stored = dc.load_tensors_metadata(str(root / "iter_0000018"))
    assert stored["optimizer.state.exp_avg.layers.q.weight"].global_shape == (4, 16, 16)  # flattened shards, whole
    with open(tmp_path / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
