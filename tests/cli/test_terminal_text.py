"""``lorafid open`` prints what came from a registry through ``terminal_text``: no escapes."""

from __future__ import annotations

import re

from lorafid.cli.output import terminal_text


def test_control_characters_and_escape_sequences_are_printed_as_question_marks() -> None:
    hostile = "org/x\x1b[2J\x1b]8;;https://evil.example\x07link\x9b31m \u202eevil\u200b\r\x00end\nnext\tcell"
    shown = terminal_text(hostile)
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]", shown)
    assert shown.startswith("org/x?[2J?]8;;https://evil.example?link?31m ?evil??") and "\nnext cell" in shown
