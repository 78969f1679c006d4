"""Byte sizes as people write them ("8GiB", "512MiB", "1.5e9", "4GB"), parsed without click.

The CLI's SIZE parameter type (shuffler/cli/__init__.py) and every library function that takes a size as
text (`memory="4GiB"`) call `parse_size`, so one grammar serves both.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgtp]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "p": 1e15, "pb": 1e15, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}
GiB = 1 << 30


def parse_size(text: str | int, *, what: str = "size") -> int:
    """'8GiB', '512MiB', '1.5e9', '4GB' -> bytes; an int passes through. ValueError names what was given."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.match(str(text))
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"{what} {text!r} is not a size like 512MiB, 8GiB or 1e9")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
