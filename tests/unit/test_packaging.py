"""pyproject.toml's dependencies and extras are complete and agree with the locks.

What a fresh `pip install ".[extra]" -c requirements/lock-*.txt` would need is checked here from the
sources and the installed metadata, in about a second:

* every third-party import under python/routing_replay/<part> is a distribution that the base
  dependencies or <part>'s extra declare (import names mapped with packages_distributions());
* every requirement of the base and the extras is pinned in both locks, at a version it accepts;
* resolving base + train + wandb + test from the installed metadata (the CPU stack setup.sh installs)
  reaches only packages the CPU lock pins, at versions every requirement on the way accepts: the
  CPU install `pip install -e ".[train,wandb,test]" -c requirements/lock-cpu.txt` needs nothing outside it.

The real install proof is scripts/setup.sh (CI runs it: it installs exactly that way and compares
the venv with the lock); the GPU lock's closure of ".[all]" is resolved by scripts/check_gpu_lock.sh.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "python" / "routing_replay"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Which extra each top-level part of routing_replay belongs to (None: the base dependencies).
PART_EXTRA: dict[str, str | None] = {
    "__init__": None, "capture": None, "rl": None, "wire": None, "config": None, "ports": None, "cli": None,
    "models": None, "settings": None, "integration_surface": None,
    "sglang": "serve",
    "megatron": "train", "orchestration": "train", "tasks": "train", "run_log": "train",
    "experiment_plots": "train", "tiny_models": "train", "demos": "train",
}
# Optional integrations: importable anywhere, but only guarded (inside a function or a try), so that
# the package works without them. Distribution -> the extra that provides it.
OPTIONAL = {"wandb": "wandb"}
# Base parts that use a distribution of an extra inside functions only (guarded): the model families'
# tiny builders import transformers when a tiny model is built, which needs the [train] extra.
GUARDED_IN_BASE = {"transformers": "train"}
# Imports that need a distribution other than the one that provides the module.
INDIRECT = {"torch.utils.tensorboard": "tensorboard"}
# Distributions imported directly but pinned exactly by a declared one (no separate requirement).
VIA = {"pydantic-core": "pydantic"}


def _pins(*files: str) -> dict[str, str]:
    pins = {}
    for name in files:
        for line in (ROOT / "requirements" / name).read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)", line)
            if m:
                pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


CPU_LOCK = _pins("lock-cpu.txt", "torch.txt")
GPU_LOCK = _pins("lock-gpu.txt")


def _requirements(extra: str | None) -> list[Requirement]:
    """The base dependencies (extra None) or one extra's, self-references (routing-replay[...]) expanded."""
    reqs = [Requirement(r) for r in (PYPROJECT["dependencies"] if extra is None
                                     else PYPROJECT["optional-dependencies"][extra])]
    out = []
    for req in reqs:
        if canonicalize_name(req.name) == "routing-replay":
            for sub in sorted(req.extras):
                out += _requirements(sub)
        else:
            out.append(req)
    return out


def _declared(extra: str | None) -> set[str]:
    names = {canonicalize_name(r.name) for r in _requirements(None)}
    if extra is not None:
        names |= {canonicalize_name(r.name) for r in _requirements(extra)}
    return names


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(every absolute import's module name, those at module level outside any try/if/def)."""
    tree = ast.parse(path.read_text(), filename=str(path))

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            return [node.module]
        return []

    every = {m for node in ast.walk(tree) for m in names(node)}
    unguarded = {m for node in tree.body for m in names(node)}
    return every, unguarded


def _third_party(module: str) -> bool:
    top = module.split(".")[0]
    return top not in sys.stdlib_module_names and top != "routing_replay"


def test_every_part_of_the_package_belongs_to_an_extra():
    parts = {_part(p) for p in PACKAGE.rglob("*.py")}
    unknown = sorted(parts - PART_EXTRA.keys())
    assert not unknown, f"new parts of routing_replay {unknown}: add them to PART_EXTRA (and their imports to pyproject)"


def test_extras_cover_every_third_party_import():
    import_to_dists = metadata.packages_distributions()
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        extra = PART_EXTRA.get(_part(path))
        declared = _declared(extra)
        every, unguarded = _imports(path)
        where = f"{path.relative_to(ROOT)} ({'base' if extra is None else extra})"
        for module in sorted(filter(_third_party, every)):
            top = module.split(".")[0]
            dists = import_to_dists.get(top)
            if not dists:
                problems.append(f"{where}: imports {module}, which no installed distribution provides")
                continue
            needed = {canonicalize_name(d) for d in dists}
            needed |= {INDIRECT[m] for m in INDIRECT if module == m or module.startswith(m + ".")}
            for dist in sorted(needed):
                if dist in OPTIONAL:
                    if module in unguarded:
                        problems.append(f"{where}: imports the optional {module} at module level, unguarded")
                    if dist not in {canonicalize_name(r.name) for r in _requirements(OPTIONAL[dist])}:
                        problems.append(f"{where}: {dist} is not in the [{OPTIONAL[dist]}] extra")
                elif extra is None and dist in GUARDED_IN_BASE and module not in unguarded:
                    if dist not in {canonicalize_name(r.name) for r in _requirements(GUARDED_IN_BASE[dist])}:
                        problems.append(f"{where}: {dist} is not in the [{GUARDED_IN_BASE[dist]}] extra")
                elif dist not in declared and VIA.get(dist) not in declared:
                    problems.append(f"{where}: imports {module} ({dist}), not declared in the base"
                                    + ("" if extra is None else f" or [{extra}]"))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("extra", [None, *sorted(PYPROJECT["optional-dependencies"])])
def test_every_requirement_is_pinned_in_both_locks(extra):
    problems = []
    for req in _requirements(extra):
        name = canonicalize_name(req.name)
        for lock_name, lock in (("lock-cpu.txt (+ torch.txt)", CPU_LOCK), ("lock-gpu.txt", GPU_LOCK)):
            version = lock.get(name)
            if version is None:
                problems.append(f"{req}: not in {lock_name}")
            elif not req.specifier.contains(Version(version), prereleases=True):
                problems.append(f"{req}: {lock_name} pins {version}")
    assert not problems, "\n".join(problems)


def test_all_is_serve_train_and_wandb():
    assert PYPROJECT["optional-dependencies"]["all"] == ["routing-replay[serve,train,wandb]"]


def test_cpu_lock_is_the_closure_of_base_train_wandb_and_test():
    """Walks the installed requirements from base + [train,wandb,test] as pip would with -c lock-cpu.txt.

    torch's own requirements are not walked: torch.txt's torch is installed first (a CPU wheel here,
    PyPI's CUDA build elsewhere, whose nvidia-* requirements the CPU lock does not list).
    """
    env = default_environment()
    problems, seen = [], set()
    todo = [(req, "routing-replay") for extra in (None, "train", "wandb", "test") for req in _requirements(extra)]
    while todo:
        req, parent = todo.pop()
        name = canonicalize_name(req.name)
        pinned = CPU_LOCK.get(name)
        if pinned is None:
            problems.append(f"{name} (required by {parent}: {req}) is not in lock-cpu.txt")
            continue
        if not req.specifier.contains(Version(pinned), prereleases=True):
            problems.append(f"{parent} requires {req}; lock-cpu.txt pins {pinned}")
        for extra in ["", *sorted(req.extras)]:
            if (name, extra) in seen or name == "torch":
                continue
            seen.add((name, extra))
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                problems.append(f"{name} is not installed (is this venv from scripts/setup.sh?)")
                continue
            if dist.version != pinned:
                problems.append(f"{name} {dist.version} is installed; lock-cpu.txt pins {pinned}")
            for line in dist.requires or []:
                sub = Requirement(line)
                if sub.marker is None or sub.marker.evaluate({**env, "extra": extra}):
                    if not extra or (sub.marker is not None and "extra" in str(sub.marker)):
                        todo.append((sub, f"{name}{f'[{extra}]' if extra else ''}"))
    assert not problems, "\n".join(sorted(set(problems)))
