"""Applies the install-time CPU-only workarounds to a virtual environment. Run by scripts/setup.sh
only when the machine has no NVIDIA GPU; never on a GPU machine.

1. torchvision: PyPI's wheel is a CUDA build whose op registrations fail against CPU torch
   ("operator torchvision::nms does not exist"). SGLang uses only torchvision.transforms, so the
   two registration modules are emptied.
2. sgl_kernel: PyPI has no CPU build usable on these cores; install the stub beside it.

Idempotent. Usage: python cpu_workarounds/apply.py (with the venv's python).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
_TORCHVISION_FILES = ("_meta_registrations.py", "_autograd_registrations.py")
_MARK = "# emptied by routing-replay cpu_workarounds (CUDA torchvision vs CPU torch)\n"


def neutralise_torchvision_registrations() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("cpu_workarounds: torchvision is not installed in this environment")
    package_dir = Path(spec.submodule_search_locations[0])
    for name in _TORCHVISION_FILES:
        (package_dir / name).write_text(_MARK)


def install_sgl_kernel_stub() -> None:
    target = Path(sysconfig.get_paths()["purelib"]) / "sgl_kernel"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(HERE / "sgl_kernel", target, ignore=shutil.ignore_patterns("__pycache__"))


def main() -> None:
    neutralise_torchvision_registrations()
    install_sgl_kernel_stub()
    print(f"cpu_workarounds: applied to {sys.prefix}")


if __name__ == "__main__":
    main()
