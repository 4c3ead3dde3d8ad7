"""Markdown table rows whose cells cannot break the table: names reach reports from folder names and results
files written elsewhere, so a '|' is escaped and a line break or other control character becomes a space."""
import unicodedata
from typing import Any, Iterable


def cell(value: Any) -> str:
    """``value`` as one Markdown table cell."""
    text = ''.join(' ' if unicodedata.category(c).startswith('C') else c for c in str(value))
    return text.replace('|', r'\|')


def row(cells: Iterable[Any]) -> str:
    """'| a | b |' with every cell escaped (``cell``)."""
    return '| ' + ' | '.join(cell(c) for c in cells) + ' |'
