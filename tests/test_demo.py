"""`make demo` works: TP=2 training on 2 ranks, resumed at TP=1 with the same losses."""

import os
import subprocess
import sys

DEMO = os.path.join(os.path.dirname(__file__), "..", "examples", "demo_gpt_tp.py")


def test_demo_resumes_with_the_same_losses():
    result = subprocess.run([sys.executable, DEMO], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": OK" in result.stdout
