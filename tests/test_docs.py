"""The docs an operator reads: every link resolves, the README stays a short start and a map,
and the lists the code owns (refusal and close reasons) are the code's own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sniproxy.reasons import Close, Refusal
from tests.helpers import REPO

DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "deploy" / "README.md",
               REPO / "bench" / "README.md", REPO / "tests" / "fixtures" / "README.md"])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [a or b for a, b in LINK.findall(text)]


def test_slug_is_githubs():
    assert slug("The builders' `/etc/hosts`") == "the-builders-etchosts"
    assert slug("Setting up on EC2: `sniproxy discover` and `sniproxy doctor`") == \
        "setting-up-on-ec2-sniproxy-discover-and-sniproxy-doctor"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves(doc):
    broken = []
    for target in links(doc):
        if re.match(r"[a-z]+:", target):  # https:, mailto:, file:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)


def test_every_doc_is_reachable_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(REPO / "README.md")}
    assert {p.resolve() for p in (REPO / "docs").glob("*.md")} <= linked


def test_readme_is_a_short_start_and_a_map():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start:end if end >= 0 else None]


def test_the_documented_refusal_reasons_are_the_codes():
    table = section(REPO / "docs" / "operations.md", "## Metrics")
    row = next(line for line in table.splitlines() if line.startswith("| `sniproxy_connections_rejected_total`"))
    assert set(re.findall(r"`([a-z_]+)`", row.split("|")[3])) == {r.value for r in Refusal}


def test_the_documented_close_values_are_the_codes():
    logs = section(REPO / "docs" / "operations.md", "## Logs")
    listed = logs[logs.index("`close` is one of these values"):]
    listed = listed[:listed.index("\n\n", listed.index("- "))]
    named = {name for pair in re.findall(r"^- `([a-z_]+)`(?: or `([a-z_]+)`)?", listed, re.M) for name in pair if name}
    assert "- a rejection reason from the metrics list" in listed
    closes, refusals = {c.value for c in Close}, {r.value for r in Refusal}
    assert named <= closes and closes - refusals <= named
