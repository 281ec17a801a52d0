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
    import numpy as np
    import tvm
    from tvm import relax

    from tvm_cim.compiler import runtime
    from tvm_cim.relay_passes import patterns

    tvm.register_global_func("tvm_cim.run", runtime.run, override=True)
    # While ``patterns`` is itself being imported (its ``import tvm`` got us here), it
    # registers the table at the end of its own import.
    if hasattr(patterns, "register"):
        patterns.register()
    tvm.target.register_tag("cim", TAG, override=True)

    @relax.pipeline.register_pipeline("cim")
    def _cim_pipeline(arch=None, precision=None, calibration=None):
        """Partition and lower for ``cim``, then TVM's default pipeline for the rest."""
        from tvm_cim.compiler.flow import lower_partitioned, partition_for_cim

        @tvm.transform.module_pass(opt_level=0, name="CimLowering")
        def _lower(mod, ctx):
            mod = partition_for_cim(mod, arch=arch, precision=precision)
            mod, _ = lower_partitioned(mod, arch=arch, precision=precision, calibration=calibration)
            return relax.get_pipeline("default")(mod)

        return _lower

    @tvm.register_global_func("relax.ext.cim", override=True)
    def _ext_codegen(functions, options, constant_names):
        """BYOC entry for ``RunCodegen``: each function becomes a crossbar program.

        The programs run through Python closures registered under the functions' symbols,
        which lives as long as this process; ``tvm_cim.build`` instead embeds each program
        in the module as a constant, which survives ``export_library``.
        """
        from tvm_cim.codegen.region import lower_region
        from tvm_cim.core.arch import CimArch
        from tvm_cim.relay_passes.extract import read_region
        from tvm_cim.relay_passes.quantize import quantize_region

        arch = CimArch.load(str(options["arch"])) if options and "arch" in options else CimArch()
        for fn in functions:
            symbol = str(fn.attrs["global_symbol"])
            region = quantize_region(read_region(symbol, fn), {}, {})
            data = lower_region(region, arch).to_bytes()
            dtypes = (
                [str(fn.ret_ty.dtype)]
                if hasattr(fn.ret_ty, "dtype")
                else [str(t.dtype) for t in fn.ret_ty.fields]
            )

            n_params = len(fn.params)

            def run(*tensors, _data=data, _n=n_params, _dtypes=dtypes):
                values = runtime.run_region(_data, [t.numpy() for t in tensors[:_n]], _dtypes)
                for dst, value in zip(tensors[_n:], values):
                    dst.copyfrom(np.ascontiguousarray(value))

            tvm.register_global_func(symbol, run, override=True)
        return []
