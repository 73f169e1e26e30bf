"""torchvision, imported without torch's compiler stack.

torch imports ``torch._dynamo`` (with sympy, torch.distributed and the inductor config: ~1.5 s of a 2-core
machine's start) lazily, the first time something compiles. torchvision 0.2x binds one of its names the moment it
is imported: ``torchvision.ops.roi_align`` imports ``torch._dynamo.utils.is_compile_supported``, which it calls
inside ``roi_align``. So every ``import torchvision`` (open_clip imports it for its transforms) pays for the compiler
stack, which an eager or ONNX Runtime run never uses.

:func:`import_torchvision` imports torchvision with two placeholders standing in ``sys.modules`` for
``torch._dynamo`` and ``torch._dynamo.utils`` for the duration of that import. The placeholder's
``is_compile_supported`` asks the real function when called (importing it then, if compiling has not already); any
other *name* asked of a placeholder during the import imports the real module and answers from it. A torchvision
(or torch) that imports a *submodule* of ``torch._dynamo`` while being imported fails to import beside the
placeholders: then they are removed, torchvision's half-imported modules dropped, and torchvision imported plainly,
compiler included. Afterwards the placeholders leave ``sys.modules``, so the next ``import torch._dynamo``
(``torch.compile``, an ONNX export, torchvision's ``tv_tensors``, which decorates with ``torch.compiler.disable``)
is the real one.

The placeholders stand in ``sys.modules`` for the whole process while torchvision imports: another thread importing
``torch._dynamo`` in that moment would see them (the plugin imports open_clip from the thread that builds the
encoder, before any other thread of the run uses torch). Hand-written because neither torch nor torchvision offers
a way to import one without the other's compiler; checked in plugins/encoders/tests/test_torchvision_import.py (the
stand-in against the real function, ``torch.compile`` afterwards, the fallback) and measured in docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
import types
from typing import Any

DYNAMO, DYNAMO_UTILS = "torch._dynamo", "torch._dynamo.utils"
_lock = threading.Lock()


def import_torchvision() -> Any:
    """``torchvision``, imported (the first time) without importing ``torch._dynamo``."""
    with _lock:
        if "torchvision" in sys.modules:
            return sys.modules["torchvision"]
        import torch

        if DYNAMO in sys.modules:  # already imported: nothing to spare
            return importlib.import_module("torchvision")
        package, utils = _placeholders()
        sys.modules[DYNAMO], sys.modules[DYNAMO_UTILS] = package, utils
        try:
            return importlib.import_module("torchvision")
        except ImportError:  # it needed a submodule of torch._dynamo: import it plainly
            _remove(package, utils)
            forget_package("torchvision")
            return importlib.import_module("torchvision")
        finally:
            _remove(package, utils)
            if torch.__dict__.get("_dynamo") is package:  # a guard: the import system binds no attribute for a module
                del torch._dynamo  # it finds in sys.modules, so the placeholder should never be torch._dynamo


def forget_package(name: str) -> None:
    """Drop package ``name`` and its submodules from ``sys.modules`` (a half-imported package, before importing it
    again another way)."""
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def _remove(*placeholders: types.ModuleType) -> None:
    for name in (DYNAMO_UTILS, DYNAMO):
        if any(sys.modules.get(name) is p for p in placeholders):
            del sys.modules[name]


def _placeholders() -> tuple[types.ModuleType, types.ModuleType]:
    package = types.ModuleType(DYNAMO, "placeholder while torchvision imports (hica_bench_encoders.torchvision_import)")
    package.__path__ = []  # a package, as the real one
    utils = types.ModuleType(DYNAMO_UTILS, package.__doc__)

    def real(name: str) -> Any:
        _remove(package, utils)
        return importlib.import_module(name)

    def lookup(module: str, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):  # introspection (inspect.getmodule reads __file__)
            raise AttributeError(name)
        return getattr(real(module), name)

    def is_compile_supported(device_type: Any) -> Any:
        return real(DYNAMO_UTILS).is_compile_supported(device_type)

    package.utils = utils
    utils.is_compile_supported = is_compile_supported
    package.__getattr__ = functools.partial(lookup, DYNAMO)  # type: ignore[attr-defined]
    utils.__getattr__ = functools.partial(lookup, DYNAMO_UTILS)  # type: ignore[attr-defined]
    return package, utils
