"""Backend choice for ``vtr.kernels``: Triton on CUDA tensors, torch elsewhere.

The Triton module is imported lazily, so importing ``vtr.kernels`` never needs Triton or a GPU. Triton reads
``TRITON_INTERPRET`` when a kernel is *decorated*, so the module is (re)loaded whenever the interpreter
setting differs from the one it was loaded under; tests can switch the interpreter on at any time.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from torch import Tensor

__all__ = ["BACKENDS", "interpreter_enabled", "load_triton", "resolve_backend"]

#: Accepted values of every ``backend=`` argument.
BACKENDS = ("auto", "triton", "torch")

_loaded: dict[bool, ModuleType] = {}


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU (same truthy values as Triton)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def resolve_backend(backend: str, *tensors: Tensor | None) -> str:
    """Return ``"triton"`` or ``"torch"`` for ``backend`` and the input tensors.

    ``"auto"`` picks Triton only when every tensor is on CUDA and Triton is importable. ``"triton"`` on a
    non-CUDA tensor is allowed only under ``TRITON_INTERPRET=1`` (the CPU interpreter, used by the tests).

    Raises:
        ValueError: unknown ``backend``, or ``"triton"`` on CPU tensors without the interpreter.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and _triton_available() else "torch"
    if not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in present})
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {', '.join(devices) or 'no tensors'}); "
            "set TRITON_INTERPRET=1 to run the Triton kernels on the CPU interpreter, or use "
            "backend='torch' or 'auto'"
        )
    return "triton"


def load_triton() -> ModuleType:
    """The ``vtr.kernels.triton_impl`` module, decorated under the current interpreter setting."""
    mode = interpreter_enabled()
    if mode not in _loaded:
        module = importlib.import_module("vtr.kernels.triton_impl")
        if getattr(module, "INTERPRETED", None) != mode:
            module = importlib.reload(module)
        _loaded.clear()
        _loaded[mode] = module
    return _loaded[mode]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
        return False
    return True
