"""The main job as the README runs it: `routing-replay train --config configs/tiny-moe-cpu.yaml`.

It must finish on a 2-core CPU machine in under 10 minutes and learn: the mean reward of the last
10 steps must beat that of the first 10 by at least REWARD_MARGIN (fixed task and seed; SGLang's
sampling is seeded, but its batching of concurrent requests still varies, so the margin leaves room
for that noise).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
REWARD_MARGIN = 0.15
WINDOW = 10


@pytest.mark.timeout(660)
def test_cpu_default_job_learns_within_ten_minutes(tmp_path):
    run_dir = tmp_path / "run"
    command = [str(Path(sys.executable).parent / "routing-replay"), "train", "--config",
               str(REPO / "configs/tiny-moe-cpu.yaml"), "--output-dir", str(run_dir), "--no-progress"]
    started = time.monotonic()
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-4000:]
    assert elapsed < 600
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/mean"] for r in records if r["step"] > 0]
    first, last = statistics.mean(rewards[:WINDOW]), statistics.mean(rewards[-WINDOW:])
    summary = f"reward {first:.3f} over the first {WINDOW} steps -> {last:.3f} over the last {WINDOW}"
    print(summary)
    assert last >= first + REWARD_MARGIN, summary
    assert all(r["routing/coverage"] == 1.0 for r in records if r["step"] > 0)
