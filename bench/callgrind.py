"""Instructions a process ran, from a callgrind dump: in total, by shared object and by function.

Instruction counts (Ir) depend on the binary, its inputs and how connections batch, not on
the machine's load or clock: the same code gives the same count on a busy machine, and on
another machine with the same Python build. So Ir per connection is the figure to compare
code changes with (``ab.py --callgrind``) and machines by (µs = Ir / the machine's
instructions per µs). User space only: the kernel's share of a connection is not counted.

The dump format: ``ob=``/``fn=`` name the object and function of the cost lines that follow
(names are compressed to ``(id)`` after their first use); a ``calls=`` line says the next
cost line is the inclusive cost of a call, which is not the caller's own.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_NAME = re.compile(r"^(ob|fn|cob|cfn|fl|fi|fe|cfi|cfl)=(?:\((\d+)\))?\s*(.*)$")
_TOTALS = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.M)


def total(path: Path) -> int:
    """The dump's total instruction count."""
    m = _TOTALS.search(path.read_bytes())
    if not m:
        raise ValueError(f"no totals in {path}")
    return int(m.group(1))


def self_costs(path: Path) -> tuple[Counter, Counter]:
    """(by (object, function), by object): instructions each ran itself, callees excluded."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}, "fl": {}}
    ob = fn = ""
    by_fn: Counter = Counter()
    by_ob: Counter = Counter()
    skip = False
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if not line:
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                if skip:  # the inclusive cost of a call: the callee's, not this function's
                    skip = False
                    continue
                parts = line.split()
                if len(parts) >= 2:
                    v = int(parts[1])
                    by_fn[(ob, fn)] += v
                    by_ob[ob] += v
                continue
            if line.startswith("calls="):
                skip = True
                continue
            m = _NAME.match(line)
            if not m:
                continue
            kind, ident, name = m.groups()
            space = {"ob": "ob", "cob": "ob", "fn": "fn", "cfn": "fn"}.get(kind, "fl")
            if ident is not None:
                if name:
                    names[space][ident] = name
                name = names[space].get(ident, name)
            if kind == "ob":
                ob = name
            elif kind == "fn":
                fn = name
    return by_fn, by_ob


def object_class(ob: str) -> str:
    """The code a shared object (a perf dso or a callgrind object) holds: kernel, interpreter,
    uvloop, libc, other C extensions, nginx, haproxy, or other."""
    name = Path(ob).name.lower() if "/" in ob else ob.lower()
    if "kernel" in name or name.startswith("[k") or name == "[vdso]":
        return "kernel"
    if "libpython" in name or re.fullmatch(r"python3?(\.\d+)?", name):
        return "interpreter (libpython)"
    if "uvloop" in name or name.startswith("loop.cpython"):
        return "uvloop (+libuv)"
    if name.startswith(("libc.so", "libc-", "ld-linux", "libm")):
        return "libc"
    if ".cpython-" in name:
        return "other C extensions"
    if name.startswith(("nginx", "ngx_")):
        return "nginx"
    if name.startswith("haproxy"):
        return "haproxy"
    return "other: " + (name or "?")


def breakdown(path: Path, per: float, top: int = 30) -> dict:
    """Per unit (``per``: the connections of the block): the total, the split by class of
    object, and the functions that ran most instructions themselves."""
    by_fn, by_ob = self_costs(path)
    tot = sum(by_ob.values()) or 1
    classes: Counter = Counter()
    for ob, v in by_ob.items():
        classes[object_class(ob)] += v
    return {"ir": tot, "ir_per_unit": tot / per if per else None,
            "by_class": {k: v / tot for k, v in classes.most_common()},
            "top_functions": [[v / tot, Path(ob).name, fn, v / per if per else None]
                              for (ob, fn), v in by_fn.most_common(top)]}
