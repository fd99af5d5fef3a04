"""Vertebral level names, superior to inferior (docs/design.md, section 1), and the
label numbers of the VerSe data set."""
from __future__ import annotations

LEVELS = ([f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)]
          + [f"L{i}" for i in range(1, 7)] + ["S1"])

# VerSe numbering: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 28 T13 (a transitional
# thirteenth thoracic vertebra, named here as in VerSe).
VERSE_LABELS = {i + 1: name for i, name in enumerate(LEVELS[:25])}
VERSE_LABELS[28] = "T13"

_ORDER = {name: i for i, name in enumerate(LEVELS)}
_ORDER["T13"] = _ORDER["T12"] + 0.5


def level_order(name: str) -> float:
    """Position of a level from the top (C1 = 0); raises ValueError for unknown names."""
    try:
        return _ORDER[name]
    except KeyError:
        raise ValueError(f"unknown vertebral level {name!r}; expected one of {', '.join(LEVELS)} or T13") from None


def levels_below(reference: str, count: int) -> list[str]:
    """Names of `count` vertebrae starting at `reference` and going down; past S1
    (or for an empty reference) the names are V<index>."""
    if not reference:
        return [f"V{i}" for i in range(count)]
    level_order(reference)  # raises for an unknown name
    # The usual column has no L6 and no T13: name them only when they are the reference.
    chain = [name for name in LEVELS if name != "L6"]
    if reference in ("T13", "L6"):
        after = "L1" if reference == "T13" else "S1"
        names = [reference] + chain[chain.index(after):]
    else:
        names = chain[chain.index(reference):]
    return [names[i] if i < len(names) else f"V{i}" for i in range(count)]
