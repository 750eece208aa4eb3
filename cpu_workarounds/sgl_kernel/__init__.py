"""Stand-in for sgl_kernel on machines without a GPU (installed by scripts/setup.sh only there).

SGLang's CPU engine imports sgl_kernel at module level, but PyPI's sgl-kernel wheel is GPU-only
and its CPU kernels need AVX-512/AMX. On a CPU without AMX every SGLang layer takes the plain
torch path and never calls a kernel from here, so imports only need to succeed: every attribute
is a function that raises NotImplementedError naming itself if it is ever called.
"""

__version__ = "0.0.0+routing-replay-cpu-stub"


def _missing(name: str):
    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not available on this CPU-only machine (routing-replay stub)")

    unavailable.__name__ = name
    return unavailable


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)
