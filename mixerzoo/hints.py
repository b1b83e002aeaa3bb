"""Messages for names that are not known: each unknown one with its closest known name."""

from __future__ import annotations

import difflib
from typing import Iterable


def unknown_names(unknown: Iterable[str], known: Iterable[str]) -> str:
    """``"'a' (did you mean 'ab'?), 'zz'"``: the unknown names, quoted, with a suggestion each."""
    known = list(known)
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, known, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(hints)
