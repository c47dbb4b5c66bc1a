"""What `discover` (and `doctor --aws`) report about the endpoints: a level, a subject, one line
saying what is wrong, and the fix, which may span several lines of commands."""

from __future__ import annotations

import dataclasses
import enum


class Level(enum.StrEnum):
    """How a check or finding came out: one vocabulary for discover, doctor and their JSON."""

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    """For discover, a blocking finding: the proxy cannot work until it is fixed."""
    SKIP = "skip"


PASS, WARN, FAIL, SKIP = Level.PASS, Level.WARN, Level.FAIL, Level.SKIP
_MARK = {FAIL: "[BLOCK]", WARN: "[WARN ]", PASS: "[ OK  ]"}


@dataclasses.dataclass(frozen=True)
class Finding:
    level: Level
    subject: str
    message: str
    fix: str = ""
    """Empty when nothing needs doing; lines after the first are shown indented under it."""


def findings_table(findings: tuple[Finding, ...] | list[Finding]) -> str:
    width = max((len(f.subject) for f in findings), default=0)
    lines = []
    for finding in findings:
        lines.append(f"{_MARK[finding.level]} {finding.subject:<{width}}  {finding.message}")
        if finding.fix:
            first, *rest = finding.fix.splitlines()
            lines.append(f"{'':7} {'':<{width}}  fix: {first}")
            lines += [f"{'':7} {'':<{width}}       {line}" for line in rest]
    return "\n".join(lines) + "\n"
