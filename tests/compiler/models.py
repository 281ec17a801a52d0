"""Small Relax modules for the cim target tests, built with the BlockBuilder."""

from __future__ import annotations

import numpy as np
from tvm import relax

R = relax.op


def _module(params, body) -> tvm.IRModule:  # noqa: F821
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def tensor(name, shape, dtype="float32"):
    return relax.Var(name, relax.TensorType(shape, dtype))


def c(a):
    return relax.const(np.asarray(a))


def float_mlp(rng, batch=4, sizes=(32, 64, 10)):
    ws = [
        rng.standard_normal((a, b)).astype("float32") / np.sqrt(a) for a, b in zip(sizes, sizes[1:])
    ]
    bs = [rng.standard_normal(b).astype("float32") * 0.1 for b in sizes[1:]]

    def body(bb, x):
        h = x
        for i, (w, b) in enumerate(zip(ws, bs)):
            h = bb.emit(R.add(R.matmul(h, c(w)), c(b)))
            if i < len(ws) - 1:
                h = bb.emit(R.nn.relu(h))
        return h

    return _module([tensor("x", (batch, sizes[0]))], body)


def float_cnn(rng, batch=2, stride=1, padding=1, dilation=1):
    w1 = rng.standard_normal((8, 3, 3, 3)).astype("float32") / 5
    b1 = rng.standard_normal((1, 8, 1, 1)).astype("float32") * 0.1
    w2 = rng.standard_normal((6, 8, 3, 3)).astype("float32") / 8
    pad = (padding,) * 4 if isinstance(padding, int) else padding

    def body(bb, x):
        h = bb.emit(R.nn.conv2d(x, c(w1), strides=stride, padding=pad, dilation=dilation))
        h = bb.emit(R.nn.relu(bb.emit(R.add(h, c(b1)))))
        h = bb.emit(R.nn.conv2d(h, c(w2), padding=1))
        h = bb.emit(R.nn.relu(h))
        n, ch, hh, ww = (int(d) for d in h.ty.shape)
        f = bb.emit(R.reshape(h, (n, ch * hh * ww)))
        w3 = rng.standard_normal((ch * hh * ww, 5)).astype("float32") / 20
        return R.matmul(f, c(w3))

    return _module([tensor("x", (batch, 3, 10, 10))], body)


def residual_block(rng, batch=2, ch=4):
    w1 = rng.standard_normal((ch, ch, 3, 3)).astype("float32") / 6
    w2 = rng.standard_normal((ch, ch, 3, 3)).astype("float32") / 6

    def body(bb, x):
        h = bb.emit(R.nn.relu(bb.emit(R.nn.conv2d(x, c(w1), padding=1))))
        h = bb.emit(R.nn.conv2d(h, c(w2), padding=1))
        return R.nn.relu(bb.emit(R.add(h, x)))

    return _module([tensor("x", (batch, ch, 6, 6))], body)


def mixed_unsupported(rng, batch=2):
    """An NHWC convolution, a matmul of two activations and a sigmoid next to a dense."""
    wd = rng.standard_normal((3, 3, 4, 4)).astype("float32")
    wf = rng.standard_normal((64, 8)).astype("float32") / 8

    def body(bb, x, y):
        h = bb.emit(
            R.nn.conv2d(
                x, c(wd), padding=1, data_layout="NHWC", kernel_layout="HWIO", out_layout="NHWC"
            )
        )
        h = bb.emit(R.sigmoid(h))
        f = bb.emit(R.reshape(h, (batch, 64)))
        d = bb.emit(R.matmul(f, c(wf)))
        return R.matmul(d, y)

    return _module([tensor("x", (batch, 4, 4, 4)), tensor("y", (8, 3))], body)


def int_matmul(rng, batch=3, k=40, n=12, zero_point=0, x_dtype="uint8"):
    """The MatMulInteger form: astype, subtract the zero point, int32 matmul."""
    w = rng.integers(-128, 128, (k, n)).astype("int8")

    def body(bb, x):
        xi = bb.emit(R.astype(x, "int32"))
        if zero_point:
            xi = bb.emit(R.subtract(xi, relax.const(zero_point, "int32")))
        wi = bb.emit(R.astype(c(w), "int32"))
        return R.matmul(xi, wi, out_dtype="int32")

    return _module([tensor("x", (batch, k), x_dtype)], body)


def int_conv(rng, batch=2, stride=1, padding=0, dilation=1, cin=3, cout=5, size=7):
    w = rng.integers(-128, 128, (cout, cin, 3, 3)).astype("int8")
    pad = (padding,) * 4 if isinstance(padding, int) else padding

    def body(bb, x):
        return R.nn.conv2d(
            x, c(w), strides=stride, padding=pad, dilation=dilation, out_dtype="int32"
        )

    return _module([tensor("x", (batch, cin, size, size), "int8")], body)


def qdq_mlp(rng, batch=8, sizes=(16, 24, 10), w_bits=8, quantize_output=False):
    """Activations as quantize/dequantize pairs, int8 weights with per-channel scales."""
    qmax = 2 ** (w_bits - 1) - 1
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        w = rng.integers(-qmax, qmax + 1, (b, a)).astype("int8")  # Gemm layout [N, K]
        scale = (rng.random(b).astype("float32") + 0.5) / (qmax * np.sqrt(a))
        bias = rng.standard_normal(b).astype("float32") * 0.05
        layers.append((w, scale, bias))

    def body(bb, x):
        q = bb.emit(R.quantize(x, c(np.float32(0.05)), c(np.int8(0)), axis=-1, out_dtype="int8"))
        h = q
        for i, (w, scale, bias) in enumerate(layers):
            a_scale = np.float32(0.05) if i == 0 else np.float32(0.04)
            zp = np.int8(0) if i == 0 else np.uint8(0)
            x_dq = bb.emit(R.dequantize(h, c(a_scale), c(zp), axis=-1))
            w_dq = bb.emit(R.dequantize(c(w), c(scale), c(np.zeros(len(scale), "int8")), axis=0))
            wt = bb.emit(R.permute_dims(w_dq, [1, 0]))
            y = bb.emit(R.add(bb.emit(R.matmul(x_dq, wt)), c(bias)))
            if i < len(layers) - 1:
                y = bb.emit(R.nn.relu(y))
                h = bb.emit(
                    R.quantize(y, c(np.float32(0.04)), c(np.uint8(0)), axis=-1, out_dtype="uint8")
                )
            elif quantize_output:
                h = bb.emit(
                    R.quantize(y, c(np.float32(0.1)), c(np.int8(0)), axis=-1, out_dtype="int8")
                )
            else:
                h = y
        return h

    return _module([tensor("x", (batch, sizes[0]))], body)
