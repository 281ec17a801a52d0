"""docs/isa.md is made from the ISA table and must not drift from it."""

from pathlib import Path

from tvm_cim.sim import isa, isa_doc

DOC = Path(__file__).resolve().parents[2] / "docs" / "isa.md"


def test_isa_doc_is_current():
    assert DOC.read_text() == isa_doc.render(), "docs/isa.md is stale: run `make docs`"


def test_isa_doc_names_every_instruction_and_operand():
    text = DOC.read_text()
    for spec in isa.INSTRUCTIONS:
        assert f"### `{spec.mnemonic}` (opcode {spec.opcode})" in text
        for field in spec.fields:
            assert f"| `{field.name}` |" in text
