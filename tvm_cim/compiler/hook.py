"""Register the ``cim`` target as soon as ``tvm`` is imported, without importing it here.

If ``tvm`` is already loaded, registration happens at once; otherwise a meta-path finder
waits for ``import tvm`` and registers right after the module has executed. This keeps
``import tvm_cim`` (and ``cim-sim``) free of TVM's start-up cost while an exported library
still finds ``tvm_cim.run`` whichever of ``tvm`` and ``tvm_cim`` a process imports first.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


class _AfterTvmImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tvm":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _uninstall()
            from tvm_cim.compiler.registration import register

            register()

        loader.exec_module = exec_then_register
        return spec


_finder = _AfterTvmImport()


def _uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def install() -> None:
    """Register now if ``tvm`` is loaded, else once it is."""
    if "tvm" in sys.modules:
        from tvm_cim.compiler.registration import register

        register()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
