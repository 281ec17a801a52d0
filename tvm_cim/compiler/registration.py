"""Registration of the ``cim`` target with TVM: tag, pipeline, patterns, codegen, runtime.

``register()`` is idempotent and runs when ``tvm`` is imported in a process that imported
``tvm_cim`` (either order; see ``tvm_cim.compiler.hook``), so ``import tvm_cim`` alone never
pays for TVM.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_registered = False

#: The target tag: llvm code generation, with ``cim`` among the keys.
TAG = {"kind": "llvm", "keys": ["cim", "cpu"]}


def register() -> None:
    """Make the ``cim`` target, pipeline, patterns, codegen and runtime known to TVM."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    import tvm
    from tvm import relax

    from tvm_cim.compiler import runtime
    from tvm_cim.core import errors
    from tvm_cim.relay_passes import patterns

    tvm.register_global_func(runtime.RUNTIME_FUNCTION, runtime.run, override=True)
    # A CimError raised inside a callback TVM makes (the codegen, the runtime function)
    # reaches the caller as itself, not as a RuntimeError.
    for error in (errors.CimError, *errors.CimError.__subclasses__()):
        tvm.error.register_error(error.__name__, error)
    # While ``patterns`` is itself being imported (its ``import tvm`` got us here), it
    # registers the table at the end of its own import.
    if hasattr(patterns, "register"):
        patterns.register()
    tvm.target.register_tag("cim", TAG, override=True)

    @relax.pipeline.register_pipeline("cim")
    def _cim_pipeline(arch=None, precision=None, calibration=None):
        """Partition and lower for ``cim``, then TVM's default pipeline for the rest."""
        from tvm_cim.compiler.plan import plan_for_cim

        @tvm.transform.module_pass(opt_level=0, name="CimLowering")
        def _lower(mod, ctx):
            lowered, _ = plan_for_cim(mod, arch=arch, precision=precision).lower(calibration)
            return relax.get_pipeline("default")(lowered)

        return _lower

    @tvm.register_global_func("relax.ext.cim", override=True)
    def _ext_codegen(functions, options, constant_names):
        """BYOC entry for ``RunCodegen``: each function becomes a crossbar program.

        Each program is lowered at the widths and arch ``partition_for_cim`` recorded on
        its function (``options["arch"]`` overrides the arch) and runs through a Python
        closure registered under the function's symbol, which lives as long as this
        process; ``tvm_cim.build`` instead embeds each program in the module as a
        constant, which survives ``export_library``.
        """
        from tvm_cim.compiler.plan import lower_function
        from tvm_cim.core.arch import CimArch

        arch = CimArch.load(str(options["arch"])) if options and "arch" in options else None
        for fn in functions:
            data = lower_function(fn, arch).to_bytes()

            def run(*tensors, _data=data):
                runtime.run_encoded(_data, tensors)

            tvm.register_global_func(str(fn.attrs["global_symbol"]), run, override=True)
        return []
