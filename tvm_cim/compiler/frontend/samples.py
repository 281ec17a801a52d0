"""Calibration samples for float models, read from ``.npz``/``.npy`` files or folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tvm_cim.core.arrays import read_arrays
from tvm_cim.core.errors import CimError

from .module import main_inputs


def _samples(name: str, array: np.ndarray, shape: tuple, dtype: str, source: str) -> np.ndarray:
    """``array`` as ``[samples, *shape]`` of ``dtype``."""
    if array.shape == shape:
        array = array[None]
    if array.ndim != len(shape) + 1 or array.shape[1:] != shape:
        raise CimError(
            f"{source}: calibration data for input {name!r} has shape {list(array.shape)}; "
            f"expected [samples, {', '.join(map(str, shape))}]"
        )
    if array.shape[0] == 0:
        raise CimError(f"{source}: calibration data for input {name!r} has no samples")
    if not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise CimError(
            f"{source}: calibration data for input {name!r} is {array.dtype}, the input is {dtype}"
        )
    return array.astype(dtype, copy=False)


def _load_arrays(path: Path) -> dict[str, np.ndarray] | np.ndarray:
    """The arrays of one file, every header and declared size checked before any data is
    read or decompressed (``tvm_cim.core.arrays``)."""
    return read_arrays(path, "calibration data", native=False)


def _from_file(path: Path, inputs: list) -> list[np.ndarray]:
    """Per input, its ``[samples, *shape]`` array from one file."""
    data = _load_arrays(path)
    names = [name for name, _, _ in inputs]
    if isinstance(data, np.ndarray):
        if len(inputs) != 1:
            raise CimError(
                f"{path}: a .npy file calibrates a single-input model; this model has inputs "
                f"{', '.join(names)}: use an .npz with one array per input"
            )
        return [_samples(names[0], data, inputs[0][1], inputs[0][2], str(path))]
    extra = [key for key in data if key not in names]
    if extra:
        raise CimError(
            f"{path}: array {extra[0]!r} is not a model input; inputs: {', '.join(names)}"
        )
    missing = [n for n in names if n not in data]
    if missing:
        raise CimError(
            f"{path}: no calibration array for input {missing[0]!r}; inputs: {', '.join(names)}"
        )
    return [_samples(n, data[n], shape, dtype, str(path)) for n, shape, dtype in inputs]


def calibration_from_npz(path_or_dir: str | Path, mod) -> list[tuple[np.ndarray, ...]]:
    """Calibration samples for ``mod`` from ``.npz``/``.npy`` files.

    Parameters
    ----------
    path_or_dir
        An ``.npz`` file with one array per input of ``mod["main"]`` (by parameter name,
        which for ``load_onnx`` modules is the ONNX input name), each ``[samples, *shape]``
        (or exactly ``shape`` for one sample); an ``.npy`` file, the same for a
        single-input model; or a directory, whose ``.npz`` and ``.npy`` files are read in
        name order and their samples concatenated.
    mod
        The module the samples are for.

    Returns
    -------
    list of tuple of numpy.ndarray
        One tuple of ``main``'s arguments per sample, as ``compile_for_cim`` takes.

    Raises
    ------
    CimError
        An unreadable file, a missing or unknown input, a shape or dtype that does not
        match, or inputs with different sample counts.
    """
    path = Path(path_or_dir)
    inputs = main_inputs(mod)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
        if not files:
            raise CimError(f"calibration directory {path} has no .npz or .npy files")
    elif path.exists():
        files = [path]
    else:
        raise CimError(f"calibration file {path} does not exist")
    columns: list[list[np.ndarray]] = [[] for _ in inputs]
    for file in files:
        for column, array in zip(columns, _from_file(file, inputs)):
            column.append(array)
    arrays = [np.concatenate(c) for c in columns]
    counts = {a.shape[0] for a in arrays}
    if len(counts) > 1:
        detail = ", ".join(f"{n}: {a.shape[0]}" for (n, _, _), a in zip(inputs, arrays))
        raise CimError(f"{path}: inputs have different numbers of samples ({detail})")
    count = counts.pop() if counts else 0
    return [tuple(a[i] for a in arrays) for i in range(count)]
