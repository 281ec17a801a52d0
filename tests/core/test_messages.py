"""One-line messages: joined, first line, shortened, and TVM's errors without their IR."""

from __future__ import annotations

from tvm_cim.core.messages import first_line, one_line, shorten, tvm_message


def test_lines_are_joined_or_the_first_kept():
    text = "\n  first part \n\n second part\n"
    assert one_line(text) == "first part second part"
    assert first_line(text) == "first part"
    assert first_line("") == ""


def test_a_long_text_keeps_its_start_and_says_it_was_shortened():
    assert shorten("short", 10) == "short"
    cut = shorten("word " * 100, 80)
    assert len(cut) <= 80 and cut.startswith("word word") and cut.endswith("shows all)")


def test_tvm_message_drops_ir_and_metadata():
    text = (
        'In ir.Op(span=None, name="relax.add", arguments=(), num_inputs=2, support_level=10), '
        "the first input shape at dim 1 is T.int64(4), the second R.shape([3]) and "
        'metadata["ir.GenericConst"][0]\n# Metadata omitted. Use show_meta=True in script() '
        "method to show it.\nmetadata = {...}\n" + "x" * 3000
    )
    assert tvm_message(ValueError(text)) == (
        "In relax.add, the first input shape at dim 1 is 4, the second [3] and a constant"
    )
