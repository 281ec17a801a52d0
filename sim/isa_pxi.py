"""Write the compiled core's view of the ISA table: ``python sim/isa_pxi.py sim/_isa.pxi``.

``_core.pyx`` includes the generated ``_isa.pxi``: the opcodes, the operand column of
every field (``MVM_SRC``), the position of each ``progb`` geometry value
(``PROGB_P_COL``), the counters, the per-opcode scoreboard tables, the tally of
each instruction's counts, the dispatch that calls ``_execute_<mnemonic>(m, ops)`` for
every instruction, and the table's fingerprint, which the core compares with
``isa.fingerprint()`` at import. The tally and the dispatch are if/elif chains on the
opcode, which Cython compiles to C switches: as fast as hand-written code.
``setup.py`` runs this file before Cython compiles the core, so it imports nothing but
``isa`` (found beside it when run as a script) and the standard library.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__:
    from . import isa
else:  # run as a script by the build, before the package is installed
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import isa

#: Most buffers one instruction reads (or writes).
_MAX_ACCESS = max(len(names) for s in isa.INSTRUCTIONS for names in (s.reads, s.writes))

_HEADER = """\
# Generated from sim/isa.py by sim/isa_pxi.py when the package is built: do not edit.

#: ``isa.fingerprint()`` of the table this core is built from.
ISA_FINGERPRINT = "{fingerprint}"
#: Mnemonics the dispatch executes, in table order.
DISPATCHED = {mnemonics!r}
#: ``SimStats`` counters, indexed like ``Machine.counters``.
COUNTERS = {counters!r}

cdef enum:
    NOPS = {nops}  # one past the largest opcode the opcode field holds
    NSHARED = {shared_units}  # units beside the crossbars: {shared_names}
    NCOUNTERS = {ncounters}
    MAX_ACCESS = {max_access}  # most buffer reads (or writes) of one instruction
"""

_TABLES = """
# Per opcode, what the scoreboard needs (operand columns are 0-based after the opcode;
# -1 where there is none).
cdef int _PER_VECTOR[NOPS]
cdef int _PER_ITEM[NOPS]  # scales with the items (not per vector)
cdef int _ROWS_OPERAND[NOPS]  # the buffer whose rows per item scale a per-vector op
cdef int _UNIT[NOPS]  # -1: the crossbar named by operand _XB_OPERAND; else a shared unit
cdef int _XB_OPERAND[NOPS]
cdef int _NREADS[NOPS]
cdef int _READS[NOPS][MAX_ACCESS]
cdef int _NWRITES[NOPS]
cdef int _WRITES[NOPS][MAX_ACCESS]


cdef void _fill_isa_tables() noexcept:
"""


def _constant(name: str) -> str:
    return name.upper().replace("-", "_")


def _operand(spec: isa.InstrSpec, name: str | None) -> str:
    return "-1" if name is None else f"{_constant(spec.mnemonic)}_{_constant(name)}"


def _enums() -> list[str]:
    lines = ["", "cdef enum:  # opcodes"]
    lines += [f"    {_constant(s.mnemonic)} = {s.opcode}" for s in isa.INSTRUCTIONS]
    lines += ["", "cdef enum:  # operand columns, 0-based after the opcode"]
    for s in isa.INSTRUCTIONS:
        lines += [f"    {_operand(s, f.name)} = {i}" for i, f in enumerate(s.fields)]
    lines += ["", "cdef enum:  # the values of a progb params constant (isa.PROGB_PARAMS)"]
    lines += [f"    PROGB_P_{_constant(n)} = {i}" for i, n in enumerate(isa.PROGB_PARAMS)]
    lines += ["", "cdef enum:  # the shared units, after the crossbars"]
    shared = [u for u in isa.UNITS if u != "crossbar"]
    lines += [f"    UNIT_{_constant(u)} = {i}" for i, u in enumerate(shared)]
    lines += ["", "cdef enum:  # counters"]
    lines += [f"    {_constant(c)} = {i}" for i, c in enumerate(isa.COUNTERS)]
    return lines


def _row(spec: isa.InstrSpec) -> list[str]:
    """The assignments that fill one opcode's table entries."""
    op = _constant(spec.mnemonic)
    unit = "-1" if spec.unit == "crossbar" else f"UNIT_{_constant(spec.unit)}"
    lines = [
        f"_PER_VECTOR[{op}] = {int(spec.per_vector)}",
        f"_PER_ITEM[{op}] = {int(spec.per_item)}",
        f"_ROWS_OPERAND[{op}] = {_operand(spec, spec.rows_from) if spec.per_vector else 0}",
        f"_UNIT[{op}] = {unit}",
        f"_XB_OPERAND[{op}] = {_operand(spec, spec.operand('crossbar'))}",
    ]
    for table, names in (("READS", spec.reads), ("WRITES", spec.writes)):
        lines.append(f"_N{table}[{op}] = {len(names)}")
        lines += [f"_{table}[{op}][{i}] = {_operand(spec, n)}" for i, n in enumerate(names)]
    return lines


def _tally_statements(spec: isa.InstrSpec) -> list[str]:
    """What one instruction does to the counters, and to the cells its crossbar holds."""
    lines = []
    image = spec.operand("image")
    xb = _operand(spec, spec.operand("crossbar"))
    if image is not None:
        lines.append(f"m.sched_cells[ops[{xb}]] = _image_cells(m, ops[{_operand(spec, image)}])")
    if spec.cells_from is not None:
        lines.append(
            f"m.sched_cells[ops[{xb}]] = _tile_cells(m, ops[{_operand(spec, spec.cells_from)}])"
        )
    for c in spec.counts:
        terms = [
            "_vectors(m, op, ops)" if spec.per_vector else ("m.batch" if spec.per_item else "1")
        ]
        if c.operand:
            terms.append(f"ops[{_operand(spec, c.operand)}]")
        if c.per_cell:
            terms.append(f"_held_cells(m, ops[{_operand(spec, spec.operand('crossbar'))}])")
        lines.append(f"m.counters[{_constant(c.counter)}] += {' * '.join(terms)}")
    return lines


def _chain(signature: str, doc: str, cases: list[tuple[isa.InstrSpec, list[str]]]) -> list[str]:
    """A cdef function that runs, for the opcode ``op``, its statements."""
    lines = ["", "", f"cdef inline void {signature} noexcept nogil:", f'    """{doc}"""']
    for i, (spec, statements) in enumerate(cases):
        lines.append(f"    {'if' if i == 0 else 'elif'} op == {_constant(spec.mnemonic)}:")
        lines += [f"        {statement}" for statement in statements]
    return lines


def _functions() -> list[str]:
    tallies = [(s, _tally_statements(s)) for s in isa.INSTRUCTIONS]
    tally = _chain(
        "_tally(Machine *m, int op, const int64_t *ops)",
        "``Timeline``'s counts: what the instruction's ``isa.Count`` entries add.",
        [(spec, lines) for spec, lines in tallies if lines],
    )
    dispatch = _chain(
        "_dispatch(Machine *m, int op, const int64_t *ops)",
        "Execute one instruction.",
        [(s, [f"_execute_{s.mnemonic}(m, ops)"]) for s in isa.INSTRUCTIONS],
    )
    return tally + dispatch


def render() -> str:
    """The text of ``_isa.pxi`` for the current table."""
    shared = [u for u in isa.UNITS if u != "crossbar"]
    header = _HEADER.format(
        fingerprint=isa.fingerprint(),
        mnemonics=tuple(s.mnemonic for s in isa.INSTRUCTIONS),
        counters=isa.COUNTERS,
        nops=1 << isa.OPCODE_BITS,
        shared_units=len(shared),
        shared_names=", ".join(shared),
        ncounters=len(isa.COUNTERS),
        max_access=max(_MAX_ACCESS, 1),
    )
    rows = [f"    {line}" for spec in isa.INSTRUCTIONS for line in _row(spec)]
    lines = [header.rstrip("\n"), *_enums(), _TABLES.rstrip("\n"), *rows]
    lines += ["", "", "_fill_isa_tables()", *_functions()]
    return "\n".join(lines) + "\n"


def write(path: str | Path) -> bool:
    """Write ``render()`` to ``path`` unless it holds it already (keeping its time stamp,
    so that Cython does not recompile an unchanged core); whether it wrote."""
    path = Path(path)
    text = render()
    if path.exists() and path.read_text() == text:
        return False
    path.write_text(text)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python sim/isa_pxi.py OUTPUT.pxi", file=sys.stderr)
        return 2
    write(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
