"""One-line text for error messages."""

from __future__ import annotations


def short_repr(value: object, limit: int = 200) -> str:
    """``repr(value)`` on one line, cut at ``limit`` characters: a tensor's or an array's repr spans lines
    (its spacing is layout, collapsed here), and an error message stays one line whatever the user passed.
    A one-line repr keeps its spacing (a string's spaces are part of the value)."""
    text = repr(value)
    if "\n" in text:
        text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
