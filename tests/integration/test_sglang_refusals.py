"""``python -m sglang.launch_server --record-routing`` with a flag whose routing we cannot record
exits at once, non-zero, naming the flag and the alternative, before any scheduler loads the model."""

from __future__ import annotations

import pytest

from routing_replay.sglang.server import SGLangServer
from tests.integration.sglang_support import SERVER_ARGS


@pytest.mark.parametrize(("flags", "alternative"), [
    (("--enable-dp-attention", "--dp-size", "2"), "--dp-size N (independent replicas"),
    (("--disaggregation-mode", "prefill"), "--disaggregation-mode null"),
], ids=["dp-attention", "pd-prefill"])
def test_a_refused_flag_ends_the_launcher_naming_it(flags, alternative, tiny_models, tmp_path):
    server = SGLangServer(tiny_models["qwen3_moe"], [*SERVER_ARGS, "--record-routing", *flags],
                          log_path=tmp_path / "refused.log")
    try:
        with pytest.raises(RuntimeError, match="SGLang server exited"):
            server.wait_healthy(timeout=120)  # the launcher alone: SGLang's import, no model load
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert server.process.returncode != 0
    assert "--record-routing cannot record" in log and flags[0] in log and alternative in log
    assert "Load weight" not in log and "Scheduler" not in log  # no scheduler was started
