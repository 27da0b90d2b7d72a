"""vggspec.display: untrusted names made safe on the terminal and in CSV cells."""

from __future__ import annotations

from vggspec.display import csv_cell, terminal


def test_control_characters_are_escaped_for_the_terminal():
    assert terminal("cat\x1b[31mred\x1b[0m") == "cat\\x1b[31mred\\x1b[0m"
    assert terminal("a\rforged: error: x\nnext\x9b2J") == "a\\x0dforged: error: x\\x0anext\\x9b2J"
    assert terminal("evil\u202eexe.png") == "evil\\u202eexe.png"
    assert terminal("line one\n  hint: two\x07", keep_newlines=True) == "line one\n  hint: two\\x07"
    assert terminal("caf\udce9.png") == "caf\\xe9.png"  # bytes that are not UTF-8, as file names keep them
    assert terminal("plain ünïcode name.jpg") == "plain ünïcode name.jpg"


def test_formula_cells_are_neutralised_with_a_quote():
    for text in ("=HYPERLINK(\"x\")", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(text) == "'" + text
    assert csv_cell("cat") == "cat" and csv_cell(7) == 7 and csv_cell("a=b") == "a=b"
