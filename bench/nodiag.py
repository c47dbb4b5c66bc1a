"""A copy of sniproxy without issue 12's hello diagnostics, to measure what they cost.

    python bench/nodiag.py [REF] [DEST]     (default: HEAD, bench/work/sniproxy-src-nodiag)

Extracts `git archive REF sniproxy` into DEST and patches the copy (never sniproxy/ itself):
`RouteStats.observe_hello` returns at once (no hello size/records/reads/time histograms, no
PQ/ECH counters), and the access log formats a line without the hello fields (alpn, pq, ech,
hello_bytes, hello_records, hello_reads, hello_ms): the line afed3e7 wrote. Then benchmark both,
interleaved:

    python bench/nodiag.py HEAD
    python bench/run.py --sniproxy-ref HEAD --also nodiag=bench/work/sniproxy-src-nodiag \\
        --only sniproxy-w1-issue,sniproxy-nodiag-w1-issue --workloads short-issue --runs 5

Each patch must apply exactly once, or this script stops: a changed source needs a look.
"""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

PATCHES = {
    "stats.py": [(
        '        """What a routed ClientHello looked like on the wire, and how long it took to arrive."""\n',
        '        """What a routed ClientHello looked like on the wire, and how long it took to arrive."""\n'
        "        return  # bench/nodiag.py: diagnostics off\n",
    )],
    "accesslog.py": [
        ("""    if hello is None:
        facts = '"sni":null,"alpn":null,"pq":null,"ech":false'
    else:
        facts = (f'"sni":{_str(hello.sni)},"alpn":{_alpn(hello.alpn)},"pq":{_str(hello.pq_group)},'
                 f'"ech":{"true" if hello.ech else "false"}')
""", """    facts = f'"sni":{_str(hello.sni if hello is not None else None)}'  # bench/nodiag.py
"""),
        ("""        f'"bytes_to_client":{to_client},"duration":{round(duration, 6)},"close":"{close}",'
        f'"hello_bytes":{hello_bytes},"hello_records":{hello_records},"hello_reads":{hello_reads},'
        f'"hello_ms":{round(hello_seconds * 1000, 3)}}}\\n'
""", """        f'"bytes_to_client":{to_client},"duration":{round(duration, 6)},"close":"{close}"}}\\n'
"""),
    ],
}


def main() -> int:
    ref = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
    dest = Path(sys.argv[2]) if len(sys.argv) > 2 else BENCH / "work" / "sniproxy-src-nodiag"
    import run
    commit = run.archive_ref(ref, dest)
    for name, edits in PATCHES.items():
        path = dest / "sniproxy" / name
        text = path.read_text()
        for old, new in edits:
            if text.count(old) != 1:
                raise SystemExit(f"{path}: the patch does not apply (found {text.count(old)} times):\n{old}")
            text = text.replace(old, new)
        path.write_text(text)
    print(f"{dest}: sniproxy at {ref} ({commit}) without the hello diagnostics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
