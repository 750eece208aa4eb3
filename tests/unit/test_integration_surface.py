"""The integration surface (``routing_replay.integration_surface``) against the installed, pinned
SGLang, megatron-core and torch: every target resolves with the parameters our code relies on, the
plugin registers exactly the hooks listed, the CPU workarounds replace exactly the attributes
listed, and ``docs/integration-surface.md`` lists the same rows.

SGLang and megatron-core are imported, and our patches applied, in one child process
(``tests.support.surface_probe``): a few seconds of imports on an idle machine.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from routing_replay.integration_surface import SURFACE, Patch
from tests.support.surface_probe import MARKER

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "integration-surface.md"
COLUMNS = ("target", "kind", "when", "our code", "tested with", "why")


@pytest.fixture(scope="module")
def probe() -> dict:
    result = subprocess.run([sys.executable, "-m", "tests.support.surface_probe"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [line for line in result.stdout.splitlines() if line.startswith(MARKER)]
    assert reports, f"no report from the probe: {result.stdout[-2000:]}"
    return json.loads(reports[-1][len(MARKER):])


def _key(patch: Patch) -> str:
    return f"{patch.target}|{patch.where}"


def _pins() -> dict[str, dict[str, str]]:
    """Package -> {"CPU": version, "GPU": version} from the two locks (CPU torch: torch.txt)."""
    pins: dict[str, dict[str, str]] = {}
    for stack, files in (("CPU", ("lock-cpu.txt", "torch.txt")), ("GPU", ("lock-gpu.txt",))):
        for name in files:
            for line in (ROOT / "requirements" / name).read_text().splitlines():
                match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
                if match:
                    pins.setdefault(match[1].lower(), {})[stack] = match[2]
    return pins


def _tested_with(package: str, pins: dict[str, dict[str, str]]) -> str:
    versions = pins[package]
    if versions.get("CPU") == versions.get("GPU"):
        return versions["CPU"]
    return ", ".join(f"{version} ({stack})" for stack, version in sorted(versions.items()))


def _row(patch: Patch, pins: dict[str, dict[str, str]]) -> tuple[str, ...]:
    return (patch.target, patch.kind, patch.when, patch.where, _tested_with(patch.package, pins), patch.why)


def _doc_rows() -> list[tuple[str, ...]]:
    """The rows of the doc's table (the one whose header is ``COLUMNS``)."""
    header = "| " + " | ".join(COLUMNS) + " |"
    text = DOC.read_text()
    assert header in text, f"docs/integration-surface.md has no table headed {header}"
    rows = []
    for line in text.split(header, 1)[1].splitlines():
        if line.startswith("| `"):
            cells = tuple(cell.strip().strip("`") for cell in line.strip().strip("|").split("|"))
            assert len(cells) == len(COLUMNS), f"a row of {len(cells)} cells, expected {COLUMNS}: {line}"
            rows.append(cells)
    return rows


def test_surface_rows_are_unique_and_complete():
    keys = [_key(p) for p in SURFACE]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    for patch in SURFACE:
        assert "|" not in patch.why, patch  # the doc's table cell separator
        assert (patch.key is not None) == (patch.kind == "dict entry"), patch


def test_every_target_resolves_with_the_parameters_we_rely_on(probe):
    problems = []
    for patch in SURFACE:
        found = probe["targets"][_key(patch)]
        if not found["exists"]:
            problems.append(f"{patch.target}: missing ({found.get('error', '')})")
        elif patch.params is not None:
            params = found["params"]
            if params is None or params[: len(patch.params)] != list(patch.params):
                problems.append(f"{patch.target}: parameters {params}, we rely on {list(patch.params)}")
    assert not problems, "\n".join(problems)


def test_installed_versions_are_the_pinned_ones():
    pins = _pins()
    for package in sorted({p.package for p in SURFACE}):
        installed = importlib.metadata.version(package).split("+")[0]
        assert installed in pins[package].values(), f"{package} {installed} is not a pinned version {pins[package]}"


def test_our_code_named_in_each_row_exists():
    for patch in SURFACE:
        location, name = patch.where.split(":")
        if location.endswith(".py"):
            tree = ast.parse((ROOT / location).read_text())
            defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        else:
            defined = set(vars(importlib.import_module(location)))
        assert name in defined, f"{patch.where} (for {patch.target}) does not exist"


def test_the_plugin_registers_exactly_the_hooks_listed(probe):
    listed = {p.target for p in SURFACE if p.kind == "hook" and (p.when == "always" or not probe["cuda"])}
    registered = set(probe["plugin"]["hooks"])
    assert registered == listed, {"not listed": sorted(registered - listed),
                                  "not registered": sorted(listed - registered)}


def test_every_kv_allocator_free_and_clear_is_hooked(probe):
    """A new allocator class in SGLang (or one that starts defining free / clear) must be hooked,
    else the rows of slots it frees would be delivered as their next owner's."""
    hooked = {p.target for p in SURFACE if p.kind == "hook" and p.target.endswith((".free", ".clear"))}
    assert set(probe["allocator_methods"]) == hooked


def test_the_recording_streamer_overrides_exactly_the_rows_listed(probe):
    listed = {p.target.rsplit(".", 1)[1] for p in SURFACE if p.kind in ("subclass", "class attribute")}
    assert set(probe["plugin"]["streamer_overrides"]) == listed


def test_the_cpu_workarounds_replace_exactly_the_attributes_listed(probe):
    expected = {p.target for p in SURFACE if p.kind in ("monkeypatch", "added attribute")
                and p.where.startswith("routing_replay.megatron.")
                and (p.when == "always" or (p.when == "no GPU" and not probe["cuda"])
                     or (p.when == "torch Adam" and probe["torch_adam"]) or (p.when == "no TE" and not probe["te"]))}
    absent = {p.target for p in SURFACE if p.kind == "added attribute"
              and probe["targets"][_key(p)]["present"]}  # added only where missing
    assert set(probe["replaced"]) == expected - absent
    if not probe["cuda"]:
        assert probe["plugin"]["alloc_cpu_module"] == "routing_replay.sglang.cpu_workarounds"


def test_the_doc_lists_exactly_the_surface():
    pins = _pins()
    doc, code = _doc_rows(), [_row(p, pins) for p in SURFACE]
    missing = [row for row in code if row not in doc]
    extra = [row for row in doc if row not in code]
    assert not missing and not extra, ("rows to add to (or correct in) docs/integration-surface.md:\n"
                                       + "\n".join(_markdown(row) for row in missing)
                                       + "\nrows in the doc that the code does not list:\n"
                                       + "\n".join(_markdown(row) for row in extra))
    assert len(doc) == len(code)


def _markdown(row: tuple[str, ...]) -> str:
    target, kind, when, where, tested, why = row
    return f"| `{target}` | {kind} | {when} | `{where}` | {tested} | {why} |"
