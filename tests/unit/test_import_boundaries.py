"""Each package imports only what lies upstream of it: capture needs torch and nothing heavier, the
model families nothing at all, and megatron-core only the megatron package."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "python" / "routing_replay"
ENGINES = ("sglang", "megatron", "ray")

BLOCKED = ("sglang", "megatron", "ray", "transformers", "zmq")


def import_with_blocked(module: str, blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys
        BLOCKED = {blocked!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked import of {{name}}")
        sys.meta_path.insert(0, Block())
        import {module}
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("ok")
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_capture_imports_with_sglang_megatron_and_ray_blocked():
    result = import_with_blocked("routing_replay.capture", BLOCKED)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_wire_imports_with_sglang_megatron_and_ray_blocked():
    result = import_with_blocked("routing_replay.wire", ("sglang", "megatron", "ray", "transformers"))
    assert result.returncode == 0, result.stderr


def test_megatron_package_never_imports_sglang_or_ray():
    code = ("import routing_replay.megatron.hf_checkpoint, routing_replay.megatron.logprobs, "
            "routing_replay.megatron.parallel, routing_replay.megatron.learner, routing_replay.megatron.torch_adam_fixes")
    result = import_with_blocked(code.split("import ", 1)[1], ("sglang", "ray"))
    assert result.returncode == 0, result.stderr


def test_sglang_package_never_imports_megatron_or_ray():
    result = import_with_blocked("routing_replay.sglang.recording, routing_replay.sglang.options", ("megatron", "ray"))
    assert result.returncode == 0, result.stderr


def test_rl_algorithm_imports_only_torch():
    modules = ("routing_replay.rl.advantages, routing_replay.rl.corrections, routing_replay.rl.objective, "
               "routing_replay.rl.metrics, routing_replay.rl.minibatch, routing_replay.rl.rollout_batch, "
               "routing_replay.rl.identity, routing_replay.rl.step_stats")
    result = import_with_blocked(modules, BLOCKED)
    assert result.returncode == 0, result.stderr


def test_top_level_package_imports_nothing_heavy():
    result = import_with_blocked("routing_replay", BLOCKED + ("torch",))
    assert result.returncode == 0, result.stderr


def imports_of(root: Path, top_level: tuple[str, ...]) -> list[str]:
    """``file:line module`` of every import statement under ``root`` (also inside functions) of a
    module whose top-level package is in ``top_level``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno} {m}" for m in modules if m.split(".")[0] in top_level]
    return found


def test_models_import_nothing_heavy_at_import_time():
    result = import_with_blocked("routing_replay.models", BLOCKED + ("torch",))
    assert result.returncode == 0, result.stderr


def test_models_never_import_an_engine_not_even_lazily():
    assert imports_of(PACKAGE / "models", ENGINES) == []


def test_the_import_scan_finds_imports_inside_functions():
    found = imports_of(PACKAGE / "megatron", ("megatron",))
    assert any(line.startswith("megatron/hf_checkpoint.py:") for line in found)


def test_only_the_megatron_package_imports_megatron_core():
    outside = [line for line in imports_of(PACKAGE, ("megatron",)) if not line.startswith("megatron/")]
    assert outside == [], "megatron-core is imported outside routing_replay/megatron/"


def test_the_blocker_itself_works():
    result = import_with_blocked("sglang", BLOCKED)
    assert result.returncode != 0
    assert "blocked import of sglang" in result.stderr
