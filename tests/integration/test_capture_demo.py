"""The capture demo end to end: a KV-cached HF engine, shared prefix, verification against HF."""

import subprocess
import sys

from routing_replay.demos.capture_demo import DemoConfig, run


def test_delivered_routing_equals_used_routing_and_hf_reference():
    reports = run(DemoConfig(requests=2, new_tokens=5, seed=3))
    assert len(reports) == 2
    for report in reports:
        assert report.equal_to_engine
        assert report.cached_prefix_rows == 24
        assert report.rows == 24 + 8 + 5 - 1  # prefix + tail + decoded, minus the last token
        assert report.hf_agreement == 1.0  # float32, same model: the uncached forward picks the same experts


def test_cli_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "routing_replay.cli", "capture-demo", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for option in ("--requests", "--new-tokens", "--seed", "--json"):
        assert option in out.stdout
