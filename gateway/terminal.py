"""Values from studies, peers and the XMPP server printed on an admin's terminal literally.

A Study Description, a Patient Name, a peer's display name or a maintenance message come from outside (a
modality, a remote operator, the server). Printed through rich they are markup (``[/]`` made ``dicomgw queue``
exit with ``MarkupError``; ``[link=...]`` became a hyperlink), and printed at all their escape sequences reach
the terminal (colour, window title, a cleared screen). :func:`plain` removes control characters (C0, DEL, C1,
and the bidirectional overrides that reorder what is shown; tab and line breaks become spaces);
:func:`cell` is such a value as a rich ``Text`` (never parsed as markup); :func:`markup` escapes it for
a string that is; :func:`quoted` is a refused value as an error message repeats it.
"""

from __future__ import annotations

import re
from typing import Any

_SPACES = re.compile(r"[\t\n\r\v\f]")
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def plain(value: object) -> str:
    return _CONTROL.sub("", _SPACES.sub(" ", str(value)))


def cell(value: object, overflow: str | None = None) -> Any:
    """``value`` as a table cell, literally (``overflow="fold"``: a long word is broken over lines, not cut)."""
    from rich.text import Text

    return Text(plain(value), overflow=overflow)  # type: ignore[arg-type]


def markup(value: object) -> str:
    from rich.markup import escape

    return escape(plain(value))


def quoted(value: object, limit: int = 80) -> str:
    """A refused value as an error message repeats it: quoted (``repr``, so a control character shows as its
    escape), cut to ``limit`` characters with its length said: a config value of thousands of characters
    would otherwise fill the admin's screen with one message."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(value)
    return f"{text[:limit]!r}... ({len(text)} characters)"
