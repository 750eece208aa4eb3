"""Start and stop one SGLang server process (``python -m sglang.launch_server``) on loopback.

The server runs in its own process group, so stopping it leaves no SGLang child behind; with
``die_with_parent`` the kernel also kills it when the thread that started it dies (a Ray actor
killed with SIGKILL cannot run a cleanup), and SGLang's own children follow their parent. On a machine without a GPU the CPU engine flags and environment
are added (``cpu_workarounds.server_flags``); every other flag passes through unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from routing_replay.ports import free_port
from routing_replay.sglang import cpu_workarounds


def _kill_when_parent_dies() -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class SGLangServer:
    def __init__(self, model_path: str | Path, args: Sequence[str] = (), *, port: int | None = None,
                 log_path: str | Path | None = None, env: dict[str, str] | None = None,
                 die_with_parent: bool = False) -> None:
        self.model_path = Path(model_path)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
                   "--host", "127.0.0.1", "--port", str(self.port), *cpu_workarounds.server_flags(), *args]
        self.log_path = Path(log_path) if log_path else None
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, **cpu_workarounds.server_env(), **(env or {})},
                                        preexec_fn=_kill_when_parent_dies if die_with_parent else None)

    def wait_healthy(self, timeout: float = 600.0) -> SGLangServer:
        """Waits for ``/health``; a server that exits fails at once. The default allows minutes: a
        large checkpoint loads that long, and so does the CPU engine on a machine other jobs share."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"SGLang server exited with {self.process.returncode}: {self.tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"SGLang server not healthy after {timeout:.0f}s: {self.tail()}")

    def tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)
        except ProcessLookupError:
            pass

    def __enter__(self) -> SGLangServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
