"""Write ``docs/isa.md`` from the ISA table: ``python -m tvm_cim.sim.isa_doc docs/isa.md``.

A test regenerates the page and compares it with the committed file, so the page
cannot drift from the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import isa
from .program import FORMAT_VERSION, MAGIC, SECTION_TAGS

_MAGIC_TEXT = MAGIC.rstrip(b"\0").decode() + "\\0"
_COUNTERS = ", ".join(f"`{c}`" for c in isa.COUNTERS)
_INTRO = f"""\
# The tvm-cim crossbar ISA

This page is made from the instruction table in `sim/isa.py`
(`make docs` rewrites it; a test fails when it is stale).

## Machine model

A program runs on `crossbars` crossbars of `rows` x `cols` cells, each cell holding
`cell_bits` bits, plus a set of int64 *buffers*, a digital unit (shift-add, accumulate,
requantize, im2col) and an I/O unit (load, store). A run treats `batch` *items*; each
buffer and tensor holds `rows` vectors of `width` integers per item (one unless declared
otherwise), `[batch * rows, width]` in all, item after item, and buffers are zeroed at
start. Every instruction works on the whole batch at once, each vector on its own except
`im2col`, which rearranges the vectors of each item.

* `prog` writes a weight-slice *image* into a crossbar; `progb` writes a crossbar from a
  buffer instead, each item's own operand (an activation, such as attention's keys),
  mapped onto cells as weights are: the crossbar then holds one matrix per item.
* `mvm` drives one bit-serial input step, the `dac_bits`-wide chunk of every input
  vector, into a crossbar; the crossbar holds the resulting column sums (differential-row
  images subtract their bottom half).
* `adc` converts held column sums into a buffer, rounding half to even to a step of
  `2**shift` and saturating to `adc_bits` (lossless when the arch has no `adc_bits`).
* `shadd` and `acc` recombine slices, polarities, input steps and row tiles; `req`
  requantizes; `load` and `store` move tensors in and out; `halt` ends the program.
* `im2col` unfolds an NHWC image buffer (`H*W` rows of `C`) into a buffer of
  convolution windows (`OH*OW` rows of `KH*KW*C`), so that a convolution runs as the
  matmul above with `OH*OW` vectors per item.

Operands must agree on rows per item: a load or store moves between a tensor and a
buffer with the same rows, `shadd`, `acc` and `req` combine buffers with the same rows,
and `adc` reads held column sums into a buffer with the rows of the `mvm` source.

The integer semantics (rounding, saturation, DAC chunks, requantization) are those of
`tvm_cim/core/quant.py`, shared with the codegen and training.

## Timing

Each instruction occupies one unit: its crossbar (`prog`, `progb`, `mvm`, `adc`), the
digital unit, or the I/O unit. Its latency is the arch's figure for its latency class,
times the vectors it treats for per-vector instructions (`batch` times the rows per item
of the buffer named below), or times `batch` for per-item instructions. Instructions
start in program order once their unit is free and their buffers are ready (read after write, write after read, write after write). The
simulator reports the makespan of that schedule (`latency_us`) and the plain sum
(`sequential_latency_us`); with one crossbar and free digital steps both equal the
CIM-AQ model, whose per-image input count is the rows per item of the `mvm` source
(`OH*OW` for a convolution). The buffers each instruction reads and writes, listed
below, are those the schedule and the verifier's dataflow checks track.

Each instruction's *Counts* line says what it adds to the simulator's counters; *vectors*
are the vectors it treats (1 where its latency is not per vector), *items* the batch's
items. The counters:
{_COUNTERS}.

## Encoding

Each instruction is one {isa.WORD_BYTES}-byte little-endian word: the opcode in bits
0..{isa.OPCODE_BITS - 1}, then the operand fields in the order listed below, each as wide
as its *bits* column (two's complement where signed). Bits past the last field are zero.
In assembly, operands are written `name=value`; table indices carry a prefix
(`b` buffer, `x` crossbar, `img` image, `c` constant, `t` tensor) and omitted flags and row fields are 0.

## Program files

Magic `{_MAGIC_TEXT}`, format version {FORMAT_VERSION}, then the sections
{", ".join(f"`{t.decode()}`" for t in SECTION_TAGS)} (metadata JSON with the arch, the
tensor and buffer tables and free `attrs`; crossbar images; int64 constants; instruction
words), then a CRC-32 of everything before it. `cim-sim verify` checks a file without
running it. Files of version 2, whose buffer and crossbar fields were
{isa.NARROW_FIELDS["buffer"]} and {isa.NARROW_FIELDS["crossbar"]} bits wide, still load.

## Instructions
"""


def _names(names: tuple[str, ...]) -> str:
    return ", ".join(f"`{n}`" for n in names) or "none"


def _count(spec: isa.InstrSpec, count: isa.Count) -> str:
    factors = ["vectors" if spec.per_vector else ("items" if spec.per_item else "1")]
    if count.operand:
        factors.append(f"`{count.operand}`")
    if count.per_cell:
        factors.append(f"the cells `{spec.operand('crossbar')}` holds")
    return f"`{count.counter}` += {' x '.join(factors)}"


def render() -> str:
    """The Markdown page for the current table."""
    parts = [_INTRO]
    for spec in isa.INSTRUCTIONS:
        latency = spec.latency_class or "none"
        scale = f" x batch x rows of `{spec.rows_from}`" if spec.per_vector else ""
        scale = " x batch (per item)" if spec.per_item else scale
        parts.append(f"\n### `{spec.mnemonic}` (opcode {spec.opcode})\n\n{spec.doc}\n\n")
        parts.append(f"* Unit: {spec.unit}. Latency class: `{latency}`{scale}.\n")
        parts.append(f"* Buffers read: {_names(spec.reads)}; written: {_names(spec.writes)}.\n")
        if spec.counts:
            parts.append(f"* Counts: {'; '.join(_count(spec, c) for c in spec.counts)}.\n")
        if spec.fields:
            parts.append("\n| operand | bits | kind | meaning |\n| --- | --- | --- | --- |\n")
            offset = isa.OPCODE_BITS
            for f in spec.fields:
                sign = ", signed" if f.signed else ""
                parts.append(
                    f"| `{f.name}` | {offset}..{offset + f.bits - 1}{sign} | {f.kind} | {f.doc} |\n"
                )
                offset += f.bits
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tvm_cim.sim.isa_doc OUTPUT.md", file=sys.stderr)
        return 2
    Path(argv[0]).parent.mkdir(parents=True, exist_ok=True)
    Path(argv[0]).write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
