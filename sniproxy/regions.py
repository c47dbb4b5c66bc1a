"""Which AWS regions exist, as far as the installed botocore knows: its partition data, read
from disk, with no AWS call.

A region botocore lists is fine. One it does not list may be a typo (``eu-wst-2``) or a region
newer than this botocore (AWS adds a few a year). The second kind follows a partition's
naming: its ``regionRegex``, with a direction word some real region uses (east, northeast,
central...). That one is worth a warning; anything else is an error.
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import NamedTuple


class Partition(NamedTuple):
    name: str
    pattern: re.Pattern
    regions: frozenset[str]


@functools.cache
def partitions() -> tuple[Partition, ...]:
    """botocore's partitions: partitions.json where botocore has it, else endpoints.json."""
    from botocore.exceptions import DataNotFoundError
    from botocore.loaders import create_loader

    loader = create_loader()
    try:
        data = loader.load_data("partitions")["partitions"]
    except DataNotFoundError:  # botocore before partitions.json
        data = loader.load_data("endpoints")["partitions"]
    return tuple(
        Partition(p.get("id") or p["partition"], re.compile(p["regionRegex"]),
                  frozenset(r for r in p["regions"] if not r.endswith("-global")))
        for p in data
    )


def botocore_version() -> str:
    import botocore

    return botocore.__version__


def _direction(region: str) -> str:
    """The word before the number: "east" in us-east-1 and in us-gov-east-1."""
    parts = region.split("-")
    return parts[-2] if len(parts) >= 3 else ""


def _closest(region: str, known: set[str], cutoff: float = 0.8) -> list[str]:
    """The known regions most like ``region``, ties included (us-esat-1: us-east-1 or us-west-1)."""
    scores = {r: difflib.SequenceMatcher(None, region, r).ratio() for r in known}
    best = max(scores.values(), default=0.0)
    return sorted(r for r, score in scores.items() if score == best) if best >= cutoff else []


class Verdict(NamedTuple):
    level: str | None
    """None: botocore knows it; "warning": named like a new region; "error": not a region."""
    message: str = ""


def judge(region: str) -> Verdict:
    known = set().union(*(p.regions for p in partitions()))
    if region in known:
        return Verdict(None)
    version = botocore_version()
    directions = {_direction(r) for r in known}
    for p in partitions():
        if p.pattern.match(region) and _direction(region) in directions:
            return Verdict("warning", f"{region!r} is not a region botocore {version} knows, but is named like a "
                                      f"new one of partition {p.name}: if it is new, upgrade botocore "
                                      "(pip install -U botocore); if not, check the spelling")
    close = _closest(region, known)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return Verdict("error", f"{region!r} is not a region botocore {version} knows{hint}")
