"""The latency study behind ``tvm-cim report``: a zoo model at its standard shapes,
compiled cost-only for an arch at a policy and at W8A8.

Policies name layers by module path, or list them in the ``named_modules()`` order of the
model's convolution and linear layers and attention matmuls (CIM-AQ's layer index, ``.npy``
policies: 74 layers for ViT-B/32). A list may include the depthwise convolutions or leave
them out (they then run at W8A8).
"""

from __future__ import annotations

import dataclasses

from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import CimError
from tvm_cim.core.precision import Precision


def _layer_order(model) -> tuple[list[str], list[str]]:
    """``(all, without the grouped ones)``: convolution, linear and attention-matmul paths
    in ``named_modules()`` order."""
    from tvm_cim.learn import zoo

    return zoo.quantizable_layers(model), zoo.quantizable_layers(model, include_depthwise=False)


def _named_precision(precision, every: list[str], dense: list[str], model_name: str):
    """A precision with an ordered list turned into names (see the module docstring)."""
    if precision is None:
        return None
    loaded = Precision.load(precision)
    if loaded.ordered is None:
        return loaded
    entries = loaded.ordered
    for names in (every, dense):
        if len(entries) == len(names):
            return Precision(by_name=dict(zip(names, entries)), source=loaded.source)
    without = f" ({len(dense)} without the depthwise ones)" if len(dense) != len(every) else ""
    raise CimError(
        f"{loaded.source}: {len(entries)} entries, but {model_name} has "
        f"{len(every)} quantizable layers (convolution, linear, attention matmul){without}"
    )


def study_arch(arch="rram-4b", crossbars: int | None = None, adc_bits: int | None = None):
    """``arch`` with the optional overrides applied (validated)."""
    arch = CimArch.load(arch)
    changes = {}
    if crossbars is not None:
        changes["crossbars"] = crossbars
    if adc_bits is not None:
        changes["adc_bits"] = adc_bits
    if not changes:
        return arch
    overrides = ", ".join(f"{k}={v}" for k, v in changes.items())
    return dataclasses.replace(arch, name=f"{arch.name} ({overrides})", **changes)


def latency_study(
    model_name: str, arch="rram-4b", precision=None, batch: int = 1, stream: bool = False
) -> dict:
    """Per-layer and total latency of a zoo model at ``precision`` and at W8A8.

    Returns a dict with ``model``, ``arch``, ``total_latency_us``,
    ``sequential_latency_us``, ``total_energy_nj``, ``w8a8_latency_us``,
    ``w8a8_energy_nj``, ``speedup`` and ``layers`` (one ``OperatorReport.to_dict()`` per
    offloaded layer, with ``writes``, ``mvm_executions`` and ``energy_nj``), all for one
    image, plus ``cpu_operators`` and ``batch``: ``CompileReport.batch_figures`` of the
    model compiled for a batch of ``batch`` images (its weight copies chosen for that
    batch); with ``stream``, also ``stream``: ``compiler.stream.stream_figures`` of a
    stream of images (weight-stationary when the tiles fit, layers pipelined). Energies
    are None when the arch gives no energy figures.
    """
    if not isinstance(batch, int) or batch < 1:
        raise CimError(f"the batch must be a positive number of images, got {batch!r}")
    from tvm_cim.learn import zoo as models

    arch = CimArch.load(arch)
    model = models.fold_batchnorm(models.build(model_name))
    every, dense = _layer_order(model)
    named = _named_precision(precision, every, dense, model_name)
    plan = _plan(model, model_name, arch, named, batch=1)
    report = plan.cost_report()
    w8a8 = report if named is None else plan.cost_report(plan.resolve(None))
    batched = report if batch == 1 else _plan(model, model_name, arch, named, batch).cost_report()
    data = report.to_dict()
    data.update(
        model=model_name,
        arch=arch.to_dict(),
        w8a8_latency_us=w8a8.total_latency_us,
        w8a8_sequential_latency_us=w8a8.sequential_latency_us,
        w8a8_energy_nj=w8a8.total_energy_nj,
        speedup=w8a8.total_latency_us / report.total_latency_us,
        batch=batched.batch_figures(batch),
    )
    if stream:
        from tvm_cim.compiler.stream import stream_figures

        data["stream"] = stream_figures(plan)
    return data


def _plan(model, model_name: str, arch: CimArch, precision, batch: int):
    """The zoo model imported for ``batch`` images and planned for ``arch``."""
    import torch

    from tvm_cim.compiler.frontend import load_torch
    from tvm_cim.compiler.plan import plan_for_cim
    from tvm_cim.learn import zoo as models

    example = torch.zeros(batch, *models.input_shape(model_name))
    mod, names = load_torch(model, example)
    return plan_for_cim(mod, arch=arch, precision=precision, names=names)


def study_table(data: dict) -> str:
    """The study as a fixed-width text table (with an energy column when the arch gives
    energy figures)."""
    with_energy = data["total_energy_nj"] is not None
    width = max([22, *(len(op["name"]) for op in data["layers"])])
    head = (
        f"{'layer':<{width}} {'kind':<6} {'input':<16} {'output':<16} {'bits':<6} "
        f"{'writes':>6} {'MVMs':>8} {'latency us':>12} {'scheduled us':>12}"
    )
    head += f" {'energy uJ':>10}" if with_energy else ""
    lines = [head, "-" * len(head)]
    for op in data["layers"]:
        shape_in = "x".join(map(str, op["in_shape"][1:]))
        shape_out = "x".join(map(str, op["out_shape"][1:]))
        line = (
            f"{op['name']:<{width}} {op['kind'][:6]:<6} {shape_in:<16} {shape_out:<16} "
            f"W{op['w_bits']}A{op['a_bits']:<3} {op['writes']:>6} {op['mvm_executions']:>8} "
            f"{op['latency_us']:>12.1f} {op['scheduled_us']:>12.1f}"
        )
        line += f" {op['energy_nj'] / 1e3:>10.3f}" if with_energy else ""
        lines.append(line)
    lines.append("-" * len(head))
    total = (
        f"total {data['total_latency_us']:.1f} us (sequential sum "
        f"{data['sequential_latency_us']:.1f} us) over {len(data['layers'])} layers; "
        f"W8A8 {data['w8a8_latency_us']:.1f} us; speedup {data['speedup']:.3f}x"
    )
    if with_energy:
        total += (
            f"; energy {data['total_energy_nj'] / 1e3:.3f} uJ "
            f"(W8A8 {data['w8a8_energy_nj'] / 1e3:.3f} uJ)"
        )
    lines.append(total)
    figures = data["batch"]
    line = (
        f"batch of {figures['batch']}: {figures['latency_us']:.1f} us, "
        f"{figures['throughput_per_s']:.1f} images/s, "
        f"{figures['writes_per_item']:.1f} writes per image"
    )
    if figures["energy_per_item_nj"] is not None:
        line += f", {figures['energy_per_item_nj'] / 1e3:.3f} uJ per image"
    lines.append(line)
    if "stream" in data:
        lines.append(_stream_line(data["stream"]))
    for cpu in data["cpu_operators"]:
        lines.append(f"on CPU: {cpu['name']} ({cpu['kind']}): {cpu['reason']}")
    return "\n".join(lines)


def _stream_line(figures: dict) -> str:
    if figures["stationary"]:
        head = (
            f"stream: weights stationary ({figures['load_writes']} writes at load, "
            f"{figures['load_us']:.1f} us)"
        )
    else:
        head = (
            "stream: tiles rewritten for every image (they do not all fit the chip at once, "
            "or the model writes run-time operands)"
        )
    line = (
        f"{head}; first image {figures['first_image_us']:.1f} us, then one every "
        f"{figures['interval_us']:.1f} us ({figures['throughput_per_s']:.1f} images/s), "
        f"{figures['writes_per_image']} writes per image"
    )
    if figures["energy_per_image_nj"] is not None:
        line += f", {figures['energy_per_image_nj'] / 1e3:.3f} uJ per image"
    return line
