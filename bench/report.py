"""Turn raw benchmark results into bench/results/latest.{json,md,png}."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

from paired import bootstrap_median
from paired import verdict as interval_verdict
from provenance import header
from proxies import C_SNIPROXY, clean_env

BULK = ("push1", "pull1", "push16", "pull16")
# per-run values kept in the summary, so that interleaved runs of two variants can be paired
PAIRED = {"push1": (("gib_per_s", "push GiB/s"), ("proxy_cpu_per_gib", "push CPU/GiB")),
          "pull1": (("gib_per_s", "pull GiB/s"), ("proxy_cpu_per_gib", "pull CPU/GiB")),
          "short-normal": (("rate_per_s", "short conn/s"), ("proxy_cpu_us_per_conn", "short CPU/conn"))}


def versions() -> dict:
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10, env=clean_env())
            return ((r.stdout or "") + (r.stderr or "")).strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            return "not installed"
    out = {"nginx": first_line(["nginx", "-v"]), "haproxy": first_line(["haproxy", "-v"]),
           "c-sniproxy": first_line([C_SNIPROXY, "-V"]), "python": sys.version.split()[0]}
    try:
        from importlib.metadata import version
        out["sniproxy"] = version("sniproxy")
    except Exception:
        out["sniproxy"] = "not installed"
    return out


def med(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def spread(values):
    """(max - min) / median over the runs: how far apart repeated measurements landed."""
    vals = [v for v in values if v is not None]
    return (max(vals) - min(vals)) / statistics.median(vals) if len(vals) > 1 and statistics.median(vals) else None


def summarize(results: dict) -> dict:
    """Per proxy, per workload: medians over runs of the figures we report."""
    out = {}
    for key, wls in results.items():
        s = out.setdefault(key, {})
        for wl, runs in wls.items():
            d = {"n": len(runs), "errors": sum(r.get("errors", 0) or 0 for r in runs)}
            if wl in BULK:
                for f in ("gib_per_s", "proxy_cpu_per_gib", "loadgen_cpu_per_gib", "upstream_cpu_per_gib"):
                    d[f] = med(r.get(f) for r in runs)
                d["proxy_cpu_per_gib_spread"] = spread(r.get("proxy_cpu_per_gib") for r in runs)
                d["gib_per_s_spread"] = spread(r.get("gib_per_s") for r in runs)
                d["loadgen_cpu_share"] = med(r["cpu_s"] / r["wall_s"] for r in runs)
            elif wl.startswith("short"):
                d["rate_per_s"] = med(r["rate_per_s"] for r in runs)
                d["proxy_cpu_us_per_conn"] = med(r.get("proxy_cpu_us_per_conn") for r in runs)
                d["proxy_cpu_us_per_conn_spread"] = spread(r.get("proxy_cpu_us_per_conn") for r in runs)
                d["rate_per_s_spread"] = spread(r["rate_per_s"] for r in runs)
                d["loadgen_cpu_share"] = med(r["cpu_s"] / r["wall_s"] for r in runs)
            elif wl.startswith("latency"):
                d["p50_us"] = med(r["lat_us"]["p50"] for r in runs)
                d["p99_us"] = med(r["lat_us"]["p99"] for r in runs)
                d["late"] = sum(r.get("late", 0) for r in runs)
            elif wl == "idle":
                d["kib_per_conn"] = med(r.get("kib_per_conn") for r in runs)
                d["ready"] = min(r["ready"] for r in runs)
                d["rss_base_kib"] = med(r["rss_base_kib"] for r in runs)
                d["rss_idle_kib"] = med(r["rss_idle_kib"] for r in runs)
            for f, _ in PAIRED.get(wl, ()):
                d[f + "_runs"] = [r.get(f) for r in runs]
            if wl.startswith("short") and wl not in PAIRED:
                d["proxy_cpu_us_per_conn_runs"] = [r.get("proxy_cpu_us_per_conn") for r in runs]
                d["rate_per_s_runs"] = [r.get("rate_per_s") for r in runs]
            if wl in BULK:
                for f in ("gib_per_s", "proxy_cpu_per_gib"):
                    d[f + "_runs"] = [r.get(f) for r in runs]
            if wl.startswith("latency"):
                d["p99_us_runs"] = [r["lat_us"]["p99"] for r in runs]
            if wl == "idle":
                d["kib_per_conn_runs"] = [r.get("kib_per_conn") for r in runs]
            # why each run cannot be trusted ('' for a clean one; absent before runs were checked)
            d["disturbed_runs"] = [r.get("disturbed", "") for r in runs]
            s[wl] = d
    return out


def fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, (int,)) or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def ratio(a, b):
    return f"{a / b:.2f}×" if a is not None and b else "–"


def get(summary, key, wl, field):
    return summary.get(key, {}).get(wl, {}).get(field)


MODES = ("auto", "on", "off")  # [server] splice; "auto" is the default and carries the verdict


def sniproxy_key(summary, workers, mode):
    """The result key of the Python sniproxy with that many workers and splice mode, if it ran."""
    k = f"sniproxy-w{workers}-splice-{mode}"
    if k in summary:
        return k
    if mode == "auto" and f"sniproxy-w{workers}-splice-default" in summary:
        return f"sniproxy-w{workers}-splice-default"  # the splice key did not exist yet
    return None


def verdict(ok):
    return "–" if ok is None else ("met" if ok else "**missed**")


def targets(summary, notes=None) -> list[dict]:
    """Every target of issue 4: {"target", "modes": {mode: [measured, ok]}, "verdict", "note"}.

    Each target is measured for every splice mode that ran; the verdict is the default's
    ("auto"), the mode a deployment runs unless it says otherwise."""
    notes = notes or {}
    rows = []

    def row(target, workers, measure, note=""):
        """measure(key) -> (measured text, ok) or None when the figures are missing."""
        modes = {}
        for mode in MODES:
            key = sniproxy_key(summary, workers, mode)
            m = measure(key) if key else None
            if m:
                modes[mode] = [m[0] + (f" ({notes[key]})" if notes.get(key) else ""), m[1]]
        ok = modes.get("auto", [None, None])[1]
        rows.append({"target": target, "modes": modes, "verdict": verdict(ok), "note": note})

    def vs(wl, field, other, limit, lower_is_better, fmt_abs=None):
        def measure(key):
            me, ref = get(summary, key, wl, field), get(summary, other, wl, field)
            if not me or not ref:
                return None
            r = me / ref
            text = f"{r:.2f}×" + (f" ({fmt_abs(me, ref)})" if fmt_abs else "")
            return text, (r <= limit if lower_is_better else r >= limit)
        return measure

    for wl in ("push1", "pull1"):
        d = wl[:4]
        row(f"bulk {d}, 1 conn, workers=1: throughput ≥1.0× nginx 256k", 1,
            vs(wl, "gib_per_s", "nginx-256k-w1", 1.0, False))
        row(f"bulk {d}, 1 conn, workers=1: throughput ≥1.4× nginx default", 1,
            vs(wl, "gib_per_s", "nginx-default-w1", 1.4, False))
        row(f"bulk {d}, 1 conn, workers=1: proxy CPU/GiB ≤0.8× nginx 256k (splice path)", 1,
            vs(wl, "proxy_cpu_per_gib", "nginx-256k-w1", 0.8, True,
               lambda a, b: f"{a:.3f} vs {b:.3f} s"))
    for wl in ("push16", "pull16"):
        row(f"bulk {wl[:4]}, 16 conns, workers=2: throughput ≥1.0× nginx 256k with 2 workers", 2,
            vs(wl, "gib_per_s", "nginx-256k-w2", 1.0, False))
    for wl, what in (("short-normal", "517 B hello"), ("short-pq", "1,739 B PQ hello")):
        row(f"short connections ({what}), workers=1: proxy CPU/conn ≤1.5× nginx ssl_preread", 1,
            vs(wl, "proxy_cpu_us_per_conn", "nginx-default-w1", 1.5, True,
               lambda a, b: f"{a:.0f} vs {b:.0f} µs"))

    def idle(key):
        kib = get(summary, key, "idle", "kib_per_conn")
        return None if kib is None else (f"{kib:.1f} KiB", kib <= 16)
    row("idle: ≤16 KiB RSS per idle proxied connection", 1, idle)

    for wl, what in (("latency-normal", "517 B hello"), ("latency-pq", "PQ hello")):
        def lat(key, wl=wl):
            me, d = get(summary, key, wl, "p99_us"), get(summary, "direct-w1", wl, "p99_us")
            if me is None or d is None:
                return None
            return f"{(me - d) / 1000:.2f} ms", me - d <= 1000
        row(f"added latency p99 ≤1 ms, loopback, 64 in flight ({what})", 1, lat)

    rows.append(metrics_target(summary))
    return rows


def clean_pairs(summary, key, ref, wl, field):
    """[(x, y)] of run i of ``key`` and of ``ref``, both undisturbed, and how many pairs were set
    aside; ([], 0) when failed runs would misalign them."""
    a, b = get(summary, key, wl, field + "_runs") or [], get(summary, ref, wl, field + "_runs") or []
    if not a or len(a) != len(b):
        return [], 0
    da = get(summary, key, wl, "disturbed_runs") or [""] * len(a)
    db = get(summary, ref, wl, "disturbed_runs") or [""] * len(b)
    pairs = [(x, y) for x, y, u, v in zip(a, b, da, db) if x and y and not u and not v]
    return pairs, sum(1 for u, v in zip(da, db) if u or v)


METRICS_TARGET = 0.02


def metrics_diffs(summary):
    """[(name, on, off, diff, spread, ratios, interval, set_aside)] for the default mode, metrics on
    vs off. diff: of the medians, as a fraction of off; spread: the larger run-to-run spread of
    the two; ratios: on/off within each undisturbed run pair (the runs interleave every proxy,
    so run i of both variants saw the same machine); interval: 95 % bootstrap interval of
    their median; set_aside: pairs left out because a run was disturbed."""
    on = sniproxy_key(summary, 1, "auto")
    off = on + "-nometrics" if on else None
    out = []
    for wl, figures in PAIRED.items():
        for field, name in figures:
            a, b = get(summary, on, wl, field), get(summary, off, wl, field)
            if not a or not b:
                continue
            sp = [x for x in (get(summary, on, wl, field + "_spread"), get(summary, off, wl, field + "_spread"))
                  if x is not None]
            pairs, aside = clean_pairs(summary, on, off, wl, field)
            ratios = [x / y for x, y in pairs]
            interval = bootstrap_median([ratios]) if len(ratios) > 1 else None
            out.append((name, a, b, (a - b) / b, max(sp) if sp else None, ratios, interval, aside))
    return out


def metrics_target(summary) -> dict:
    """Met: every figure's interval within 2 %. Missed: some figure's interval entirely beyond.
    Otherwise the runs cannot say, and the verdict says by how much (bench/ab.py can)."""
    target = "metrics on vs off (splice auto, workers=1): ≤2% difference in any figure"
    diffs = metrics_diffs(summary)
    if not diffs:
        return {"target": target, "modes": {}, "verdict": "–", "note": "not run"}
    name, _, _, d, _, _, _, _ = max(diffs, key=lambda x: abs(x[3]))
    verdicts = {n: interval_verdict(iv[0], iv[1], METRICS_TARGET) for n, *_, iv, _ in diffs if iv}
    text = "; ".join([f"worst median {100 * d:+.1f}% ({name})"] + [f"{n}: {v}" for n, v in verdicts.items()]
                     + ([] if verdicts else ["every run pair disturbed or too few"]))
    if len(verdicts) == len(diffs) and all(v.startswith("within") for v in verdicts.values()):
        v = "met"
    elif any(v.startswith("beyond") for v in verdicts.values()):
        v = "**missed** (" + ", ".join(n for n, x in verdicts.items() if x.startswith("beyond")) + ")"
    else:
        v = "not resolved by these runs: see the intervals below, or measure it with bench/ab.py"
    return {"target": target, "modes": {"auto": [text, v == "met"]}, "verdict": v, "note": ""}


# ---------------------------------------------------------------- issue 14

ISSUE_NGINX = {"issue-a": "nginx-issue-a-w1", "issue-b": "nginx-issue-b-w1"}
ISSUE_HAPROXY = {"issue-a": "haproxy-issue-a-w1", "issue-b": "haproxy-issue-b-w1"}


def paired(summary, key, ref, wl, field="proxy_cpu_us_per_conn"):
    """Per-run ratios key/ref over the undisturbed pairs (the runs interleave, so run i of both
    saw the same machine): (median, min, max, n, interval, set aside), or None. ``interval`` is
    a 95 % bootstrap interval of the median (None for fewer than 3 pairs)."""
    pairs, aside = clean_pairs(summary, key, ref, wl, field)
    rs = [x / y for x, y in pairs]
    if not rs:
        return None
    return (statistics.median(rs), min(rs), max(rs), len(rs),
            bootstrap_median([rs]) if len(rs) >= 3 else None, aside)


def fmt_ratio(p):
    if not p:
        return "–"
    m, lo, hi, n, interval, aside = p
    if n == 1:
        return f"{m:.2f}×"
    text = f"{m:.2f}× ({lo:.2f}–{hi:.2f}"
    if interval and (interval[0] > lo or interval[1] < hi):  # with few runs it is the min-max itself
        text += f"; 95% {interval[0]:.2f}–{interval[1]:.2f}"
    return text + (f"; {aside} disturbed set aside)" if aside else ")")


def cpu_cell(summary, key, wl):
    c = get(summary, key, wl, "proxy_cpu_us_per_conn")
    runs = [x for x in (get(summary, key, wl, "proxy_cpu_us_per_conn_runs") or []) if x]
    if c is None:
        return "–"
    return f"{c:.0f}" + (f" ({min(runs):.0f}–{max(runs):.0f})" if len(runs) > 1 else "")


def issue_profile_of(key):
    for prof in ("issue-a", "issue-b"):
        if key.endswith("-" + prof) or f"-{prof}-w" in key:
            return prof
    return None


def issue14_markdown(meta, labels, summary) -> list[str]:
    L = []
    keys = [k for k in summary if "short-issue" in summary[k]]
    if not keys:
        return L
    w = meta.get("short", {}).get("short-issue", {})
    L.append("## Issue 14's workload (`short-issue`), workers=1\n")
    L.append(f"Each connection: a Chrome-shaped {meta['hello_bytes'].get('chrome', 517)} B hello "
             f"({'alone in its first write, ' if w.get('split') else ''}then a 64 B line ending in `\\n`, "
             f"{'no' if not w.get('cmd') else 'a'} command header), the upstream echoes the line and closes first, "
             f"the client closes on that FIN; {meta['in_flight']} in flight, {meta['duration_s']} s. "
             "Profile a: six extra ECR-style routes, IP-literal upstreams, metrics on, access log off; "
             "b: the same with the access log on (every product logs one line per connection to a file). "
             "CPU µs/conn: median (min–max of the runs). Ratios: median of the per-run ratios (min–max); "
             "the runs interleave, so run i of both proxies saw the same machine.\n")
    L.append("| proxy | conn/s | CPU µs/conn | ×nginx (same profile) | ×HAProxy (same profile) |")
    L.append("|---|---:|---:|---:|---:|")
    for k in keys:
        prof = issue_profile_of(k) or "issue-a"
        L.append(f"| {labels.get(k, k)} (`{k}`) | {fmt(get(summary, k, 'short-issue', 'rate_per_s'))} | "
                 f"{cpu_cell(summary, k, 'short-issue')} | "
                 f"{fmt_ratio(paired(summary, k, ISSUE_NGINX[prof], 'short-issue'))} | "
                 f"{fmt_ratio(paired(summary, k, ISSUE_HAPROXY[prof], 'short-issue'))} |")
    L.append("")
    return L


def gap_markdown(meta, labels, summary) -> list[str]:
    """--gap: the workloads between the bench's short-normal and issue 14's short-issue, and the
    sniproxy config variants, each as CPU µs/conn and per-run ratio to nginx on the same workload."""
    wls = [w for w in ("short-normal", "short-issue", "short-issue-1write", "short-issue-cmd",
                       "short-issue-clientfin", "short-issue-python") if any(w in v for v in summary.values())]
    if not meta.get("gap") or not wls:
        return []
    short = meta.get("short", {})
    L = ["## Issue 14's gap: which difference moves the ratio\n",
         "Workloads (columns): the bench's own `short-normal` (Python 517 B hello, 16 B command header, client "
         "closes first, hello and payload in one write), issue 14's `short-issue`, and `short-issue` with one "
         "thing changed back. Cells: CPU µs/conn, median (min–max); below it the median per-run ratio to "
         "`nginx-issue-a-w1` on the same workload.\n"]
    desc = {w: ", ".join([short[w]["hello"] + " hello", "cmd header" if short[w]["cmd"] else "no header",
                          short[w]["fin"] + " FIN first", "2 writes" if short[w]["split"] else "1 write"])
            for w in wls if w in short}
    L.append("| proxy | " + " | ".join(f"`{w}`<br>{desc.get(w, '')}" for w in wls) + " |")
    L.append("|---|" + "---:|" * len(wls))
    ref = "nginx-issue-a-w1"
    for k in summary:
        if not any(w in summary[k] for w in wls):
            continue
        cells = []
        for w in wls:
            c = cpu_cell(summary, k, w)
            r = paired(summary, k, ref, w)
            cells.append(c if c == "–" else f"{c}<br>{fmt_ratio(r)}")
        L.append(f"| `{k}` | " + " | ".join(cells) + " |")
    L.append("")
    return L


def same_runs(summary, key, ref, wl, field):
    a, b = get(summary, key, wl, field + "_runs"), get(summary, ref, wl, field + "_runs")
    if not a or not b or len(a) != len(b):
        return []
    return [x / y for x, y in zip(a, b) if x and y]


def issue14_targets(summary, old: str | None) -> list[dict]:
    """Issue 14's targets. ``old``: the --also name of afed3e7 (keys sniproxy-OLD-*)."""
    rows = []

    def add(target, measured, ok, note=""):
        rows.append({"target": target, "measured": measured,
                     "verdict": "–" if ok is None else ok if isinstance(ok, str) else ("met" if ok else "**missed**"),
                     "note": note})

    for prof in ("issue-a", "issue-b"):
        key, ref = f"sniproxy-w1-{prof}", ISSUE_NGINX[prof]
        p = paired(summary, key, ref, "short-issue")
        what = "metrics on, access log " + ("off" if prof == "issue-a" else "on (all products)")
        if p:
            ok = "met (stretch 1.3× too)" if p[0] <= 1.3 else ("met" if p[0] <= 1.5 else False)
            extra = ""
            if old:
                po = paired(summary, f"sniproxy-{old}-w1-{prof}", ref, "short-issue")
                extra = f"; afed3e7 {fmt_ratio(po)}" if po else ""
            add(f"short-issue CPU/conn ≤1.5× nginx (stretch 1.3×), {what}",
                f"{fmt_ratio(p)} ({get(summary, key, 'short-issue', 'proxy_cpu_us_per_conn'):.0f} vs "
                f"{get(summary, ref, 'short-issue', 'proxy_cpu_us_per_conn'):.0f} µs){extra}", ok)
    p = paired(summary, "sniproxy-w1-splice-auto", "nginx-default-w1", "short-normal")
    if p:
        add("short-normal (the bench's own) CPU/conn ≤1.5× nginx, metrics on, access log on (stderr)", fmt_ratio(p),
            "met" if p[0] <= 1.5 else False)
    if not old:
        return rows
    for wl, w in (("push1", 1), ("pull1", 1), ("push16", 2), ("pull16", 2)):
        new, prev = f"sniproxy-w{w}-splice-auto", f"sniproxy-{old}-w{w}-splice-auto"
        for field, name, better in (("gib_per_s", "throughput", 1), ("proxy_cpu_per_gib", "CPU/GiB", -1)):
            a, b = get(summary, new, wl, field), get(summary, prev, wl, field)
            if not a or not b:
                continue
            rs = same_runs(summary, new, prev, wl, field)
            sp = max(x for x in (get(summary, new, wl, field + "_spread"), get(summary, prev, wl, field + "_spread"),
                                 0.0) if x is not None)
            r = a / b
            worse = (r < 1) if better > 0 else (r > 1)
            if not worse:
                ok = True
            elif rs and all(((x < 1) if better > 0 else (x > 1)) for x in rs) and abs(r - 1) > sp / 2:
                ok = False
            else:
                ok = "not resolved: worse by less than the run-to-run noise"
            add(f"{wl} ({w} worker{'s' if w > 1 else ''}): {name} no worse than afed3e7 splice auto",
                f"{r:.2f}× afed3e7 ({fmt(a, 3)} vs {fmt(b, 3)}; per run "
                f"{', '.join(f'{x:.2f}' for x in rs) or '–'}; spread {100 * sp:.0f}%)", ok)
    a, b = get(summary, "sniproxy-w1-splice-auto", "idle", "kib_per_conn"), get(summary, f"sniproxy-{old}-w1-splice-auto", "idle", "kib_per_conn")
    if a is not None and b is not None:
        add("idle memory no worse than afed3e7", f"{a:.2f} vs {b:.2f} KiB/conn", a <= b * 1.05 if a > b else True,
            "within 5% counts as no worse: RSS moves by whole pages" if b < a <= b * 1.05 else "")
    d = get(summary, "direct-w1", "latency-normal", "p99_us")
    a, b = get(summary, "sniproxy-w1-splice-auto", "latency-normal", "p99_us"), get(summary, f"sniproxy-{old}-w1-splice-auto", "latency-normal", "p99_us")
    if None not in (a, b, d):
        add("added p99 latency at 64 in flight below afed3e7's (latency-normal)",
            f"{a - d:.0f} vs {b - d:.0f} µs", a < b)
    for prof in ("issue-a", "issue-b"):
        a = paired(summary, f"sniproxy-w1-{prof}", f"sniproxy-nodiag-w1-{prof}", "short-issue")
        if a:
            m, lo, hi, n = a[:4]
            ok = True if lo <= 1.0 <= hi or m <= 1.0 else ("not resolved" if lo > 1 and m - 1 < 0.03 else False)
            add(f"hello diagnostics cost nothing measurable ({prof}: HEAD vs HEAD with observe_hello a no-op and no "
                "hello fields in the access log)", f"{fmt_ratio(a)} of the no-diagnostics copy", ok)
    return rows


def markdown(meta, proxies, summary, errors) -> str:
    labels = {p.key: p.label + (f" ({p.note})" if p.note else "") for p in proxies}
    L = []
    L.append("# sniproxy benchmark\n")
    L.append(f"{meta['date']} · {meta['runs']} runs{' (quick)' if meta['quick'] else ''}, medians reported · "
             f"{meta['duration_s']} s per workload · {meta['cpus']} CPUs · kernel {meta['kernel']} · "
             f"took {meta['elapsed_s']:.0f} s · load average {meta.get('loadavg_start', 0):.1f} at start"
             + (f" · niceness {meta['nice']}" if meta.get("nice") else "") + "\n")
    L.append(header(meta))
    L.append(f"> This machine has {meta['cpus']} cores shared by the load generator, the upstream and the proxy "
             "(and other jobs), so absolute throughput and rates are not portable. **The CPU-per-unit figures "
             "(CPU s per GiB, CPU µs per connection, KiB per idle connection) are the portable ones.** "
             "CPU is utime+stime of the proxy's whole process tree from /proc/<pid>/stat.\n")
    L.append("Versions: " + ", ".join(f"{k} `{v}`" for k, v in meta["versions"].items())
             + f"; sniproxy benchmarked: {meta.get('sniproxy_source', '?')}\n")
    L.append(f"Every connection sends a real ClientHello with SNI: {meta['hello_bytes']['normal']} B (Python ssl) "
             f"or {meta['hello_bytes']['pq']} B (with an X25519MLKEM768 key share, sent as 2 segments of ≤1448 B).\n")

    def bulk_table(title, wls, workers):
        L.append(f"## {title}\n")
        L.append("| proxy | " + " | ".join(f"{w[:4]} GiB/s | ×nginx def | ×nginx 256k | {w[:4]} CPU s/GiB | ×nginx 256k"
                                           for w in wls) + " |")
        L.append("|---|" + "---:|" * (5 * len(wls)))
        for key in keys_for(summary, workers, wls):
            cells = []
            for w in wls:
                g, c = get(summary, key, w, "gib_per_s"), get(summary, key, w, "proxy_cpu_per_gib")
                gd, g2 = get(summary, f"nginx-default-w{workers}", w, "gib_per_s"), get(summary, f"nginx-256k-w{workers}", w, "gib_per_s")
                c2 = get(summary, f"nginx-256k-w{workers}", w, "proxy_cpu_per_gib")
                cells += [fmt(g), ratio(g, gd), ratio(g, g2), fmt(c, 3), ratio(c, c2)]
            L.append(f"| {labels.get(key, key)}{err_mark(summary, key, wls)} | " + " | ".join(cells) + " |")
        L.append("")

    bulk_table("Bulk, 1 connection, workers=1 (push = client→upstream, pull = upstream→client)", ("push1", "pull1"), 1)
    bulk_table("Bulk, 16 connections, workers=2", ("push16", "pull16"), 2)

    L.append(f"## Short connections, workers=1 ({meta['in_flight']} in flight: connect, hello, 64 B echo, close)\n")
    L.append("| proxy | conn/s (517 B hello) | CPU µs/conn | ×nginx | conn/s (PQ hello) | CPU µs/conn | ×nginx |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    wls = ("short-normal", "short-pq")
    for key in keys_for(summary, 1, wls):
        cells = []
        for w in wls:
            c, n = get(summary, key, w, "proxy_cpu_us_per_conn"), get(summary, "nginx-default-w1", w, "proxy_cpu_us_per_conn")
            cells += [fmt(get(summary, key, w, "rate_per_s")), fmt(c, 1), ratio(c, n)]
        L.append(f"| {labels.get(key, key)}{err_mark(summary, key, wls)} | " + " | ".join(cells) + " |")
    L.append("")

    L.extend(issue14_markdown(meta, labels, summary))
    L.extend(gap_markdown(meta, labels, summary))
    old = next((n for n in meta.get("also", {}) if n == "old"), None)
    t14 = issue14_targets(summary, old)
    if t14:
        L.append("## Targets (issue 14)" + (f", against afed3e7 (`sniproxy-{old}-*`: {meta['also'][old]})" if old else "") + "\n")
        L.append("| target | measured | verdict |")
        L.append("|---|---|---|")
        for t in t14:
            L.append(f"| {t['target']} | {t['measured']}{(' — ' + t['note']) if t['note'] else ''} | {t['verdict']} |")
        L.append("")
    L.append(f"## Added latency, workers=1 (hello sent → first upstream byte back; {meta['latency_rate']} conn/s "
             f"offered, at most {meta['in_flight']} in flight; added = proxy − direct, µs)\n")
    L.append("| proxy | p50 | p99 | added p50 | added p99 | PQ p50 | PQ p99 | PQ added p50 | PQ added p99 |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    wls = ("latency-normal", "latency-pq")
    for key in keys_for(summary, 1, wls):
        cells = []
        for w in wls:
            p50, p99 = get(summary, key, w, "p50_us"), get(summary, key, w, "p99_us")
            d50, d99 = get(summary, "direct-w1", w, "p50_us"), get(summary, "direct-w1", w, "p99_us")
            cells += [fmt(p50, 0), fmt(p99, 0), fmt(p50 - d50 if p50 is not None and d50 is not None else None, 0),
                      fmt(p99 - d99 if p99 is not None and d99 is not None else None, 0)]
        L.append(f"| {labels.get(key, key)}{err_mark(summary, key, wls)} | " + " | ".join(cells) + " |")
    L.append("")

    L.append(f"## Idle connections, workers=1 ({meta['idle_conns']} proxied connections held open after the hello)\n")
    L.append("| proxy | ready | RSS before (MiB) | RSS with idle conns (MiB) | KiB per idle conn | ×nginx |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for key in keys_for(summary, 1, ("idle",)):
        k, n = get(summary, key, "idle", "kib_per_conn"), get(summary, "nginx-default-w1", "idle", "kib_per_conn")
        b, i = get(summary, key, "idle", "rss_base_kib"), get(summary, key, "idle", "rss_idle_kib")
        L.append(f"| {labels.get(key, key)} | {get(summary, key, 'idle', 'ready')} | "
                 f"{fmt(b / 1024 if b else None, 1)} | {fmt(i / 1024 if i else None, 1)} | {fmt(k, 1)} | {ratio(k, n)} |")
    L.append("")

    L.append("## Targets (issue 4)\n")
    L.append("The verdict is for the default, `splice = \"auto\"`; the other modes are shown for comparison.\n")
    L.append("| target | splice auto (default) | verdict | splice on | splice off |")
    L.append("|---|---|---|---|---|")
    for t in targets(summary, {p.key: p.note for p in proxies}):
        cell = lambda m, t=t: (t["modes"][m][0] + ("" if m == "auto" or t["modes"][m][1] is None else  # noqa: E731
                          (" met" if t["modes"][m][1] else " missed"))) if m in t["modes"] else "–"
        L.append(f"| {t['target']} | {cell('auto') if t['modes'] else t['note'] or '–'} | {t['verdict']} | "
                 f"{cell('on')} | {cell('off')} |")
    L.append("")
    diffs = metrics_diffs(summary)
    if diffs:
        L.append("Metrics on vs off (splice auto, workers=1): medians, run-to-run spread ((max − min) / median "
                 "over the runs, the larger of the two variants), and on/off within each undisturbed run pair "
                 "(runs interleave every proxy, so run i of both variants saw the same machine) with their "
                 "median, min–max and a 95% bootstrap interval of that median. A pair is set aside when either "
                 "run was disturbed (other processes used more than "
                 f"{procs_limits()} meanwhile). `bench/ab.py --callgrind` resolves it to about ±0.5% (user space; the system calls per connection are the same either way).\n")
        L.append("| figure | metrics on | metrics off | difference of medians | spread | paired: median (min–max) "
                 "| 95% interval | each pair | set aside | verdict (±2%) |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
        for n, a, b, d, sp, rs, iv, aside in diffs:
            pm = f"{100 * (statistics.median(rs) - 1):+.1f}% ({100 * (min(rs) - 1):+.1f} to {100 * (max(rs) - 1):+.1f})" if rs else "–"
            ivt = f"{100 * (iv[0] - 1):+.1f}% to {100 * (iv[1] - 1):+.1f}%" if iv else "–"
            L.append(f"| {n} | {fmt(a, 3)} | {fmt(b, 3)} | {100 * d:+.1f}% | "
                     f"{'–' if sp is None else f'{100 * sp:.0f}%'} | {pm} | {ivt} | "
                     f"{', '.join(f'{100 * (x - 1):+.1f}%' for x in rs) or '–'} | {aside} | "
                     f"{interval_verdict(iv[0], iv[1], METRICS_TARGET) if iv else 'too few pairs'} |")
        L.append("")
    L.extend(disturbed_markdown(summary))

    L.append("## The load generator and upstream are not the bottleneck\n")
    for workers, wls in ((1, ("push1", "pull1")), (2, ("push16", "pull16"))):
        for w in wls:
            d = get(summary, f"direct-w{workers}", w, "gib_per_s")
            best = max(((get(summary, k, w, "gib_per_s") or 0, k) for k in summary if not k.startswith("direct")),
                       default=(0, None))
            lg = get(summary, f"direct-w{workers}", w, "loadgen_cpu_per_gib")
            up = get(summary, f"direct-w{workers}", w, "upstream_cpu_per_gib")
            if d and best[1]:
                L.append(f"- {w}: direct {d:.2f} GiB/s vs best proxy {best[0]:.2f} GiB/s ({best[1]}); "
                         f"load generator {fmt(lg, 3)} + upstream {fmt(up, 3)} CPU s/GiB (both single-threaded, "
                         "zero-copy: sendfile from a memfd, recv with MSG_TRUNC)")
    shares = [get(summary, k, "short-normal", "loadgen_cpu_share") for k in summary if not k.startswith("direct")]
    shares = [s for s in shares if s is not None]
    d = get(summary, "direct-w1", "short-normal", "rate_per_s")
    best = max((get(summary, k, "short-normal", "rate_per_s") or 0 for k in summary if not k.startswith("direct")), default=0)
    if d and best:
        L.append(f"- short connections: direct {d:,.0f} conn/s vs best proxy {best:,.0f} conn/s; the load generator "
                 f"used {min(shares):.0%}–{max(shares):.0%} of one core during proxied runs")
    L.append("")
    skipped = [p for p in proxies if p.skip]
    if skipped or errors:
        L.append("## Not run\n")
        for p in skipped:
            L.append(f"- {p.key}: {p.skip}")
        for e in errors:
            L.append(f"- error: {e}")
        L.append("")
    L.append("Raw per-run numbers: `latest.json`. Chart: `latest.png`.\n")
    return "\n".join(L)


def procs_limits() -> str:
    import procs
    return f"{procs.MAX_OTHER_CORES} cores, or steal above {procs.MAX_STEAL:.0%}"


def disturbed_markdown(summary) -> list[str]:
    """Every run another process disturbed: which, and why."""
    rows = [(k, wl, i + 1, why) for k, wls in summary.items() for wl, d in wls.items()
            for i, why in enumerate(d.get("disturbed_runs") or []) if why]
    checked = sum(len(d.get("disturbed_runs") or []) for wls in summary.values() for d in wls.values())
    if not checked:
        return []
    L = [f"## Disturbed runs ({len(rows)} of {checked})\n",
         f"A run is disturbed when processes outside the benchmark used more than {procs_limits()} while it "
         "ran (from /proc/stat, minus the benchmark's own process trees). Paired ratios leave such pairs out.\n"]
    if rows:
        L += ["| proxy | workload | run | why |", "|---|---|---:|---|"]
        L += [f"| `{k}` | {wl} | {i} | {why} |" for k, wl, i, why in rows]
    else:
        L.append("None.")
    L.append("")
    return L


def err_mark(summary, key, wls):
    n = sum(get(summary, key, w, "errors") or 0 for w in wls)
    return f" ⚠ {n} errors" if n else ""


def keys_for(summary, workers, wls):
    return [k for k in summary if k.endswith(f"-w{workers}") or f"-w{workers}-" in k
            if any(w in summary[k] for w in wls)]


def chart(path: Path, meta, summary) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("Bulk 1 conn, workers=1: GiB/s", 1, [("push1", "gib_per_s", "push"), ("pull1", "gib_per_s", "pull")]),
        ("Bulk 1 conn, workers=1: proxy CPU s/GiB", 1, [("push1", "proxy_cpu_per_gib", "push"), ("pull1", "proxy_cpu_per_gib", "pull")]),
        ("Bulk 16 conns, workers=2: GiB/s", 2, [("push16", "gib_per_s", "push"), ("pull16", "gib_per_s", "pull")]),
        ("Short conns, workers=1: proxy CPU µs/conn", 1, [("short-normal", "proxy_cpu_us_per_conn", "517 B hello"),
                                                          ("short-pq", "proxy_cpu_us_per_conn", "PQ hello")]),
        ("Latency hello → first byte (µs, log scale), workers=1", 1,
         [("latency-normal", "p50_us", "p50, 517 B hello"), ("latency-normal", "p99_us", "p99, 517 B hello"),
          ("latency-pq", "p99_us", "p99, PQ hello")]),
        (f"Idle: KiB per conn ({meta['idle_conns']} conns)", 1, [("idle", "kib_per_conn", "KiB/conn")]),
    ]
    fig, axes = plt.subplots(3, 2, figsize=(14, 15))
    for ax, (title, workers, series) in zip(axes.flat, panels):
        keys = [k for k in keys_for(summary, workers, [s[0] for s in series])
                if any((get(summary, k, wl, f) or 0) > 0 for wl, f, _ in series)]
        keys = keys[::-1]
        h = 0.8 / len(series)
        for i, (wl, f, name) in enumerate(series):
            vals = [get(summary, k, wl, f) or 0 for k in keys]
            ys = [y + i * h for y in range(len(keys))]
            bars = ax.barh(ys, vals, height=h, label=name)
            ax.bar_label(bars, labels=[fmt(v, 2) if v else "" for v in vals], fontsize=7, padding=2)
        ax.set_ylim(-0.5, len(keys) - 0.2)
        ax.set_yticks([y + h * (len(series) - 1) / 2 for y in range(len(keys))])
        ax.set_yticklabels(keys, fontsize=8)
        ax.set_title(title, fontsize=10)
        if not keys:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
        elif "log scale" in title:
            ax.set_xscale("log")
        if keys:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.05), ncol=3, frameon=False)
        ax.margins(x=0.15)
    fig.suptitle(f"sniproxy benchmark, {meta['date']} — {meta['cpus']} cores shared with load generator and "
                 "upstream: CPU-per-unit panels are the portable ones", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(out: Path, meta, proxies, results, errors) -> None:
    summary = summarize(results)
    data = {"meta": meta, "not_run": {p.key: p.skip for p in proxies if p.skip}, "errors": errors,
            "labels": {p.key: p.label for p in proxies},
            "proxies": [{"key": p.key, "family": p.family, "label": p.label, "workers": p.workers,
                         "note": p.note, "skip": p.skip} for p in proxies],
            "summary": summary,
            "targets": targets(summary, {p.key: p.note for p in proxies}),
            "targets_issue14": issue14_targets(summary, "old" if "old" in meta.get("also", {}) else None),
            "raw": results}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(markdown(meta, proxies, summary, errors))
    try:
        chart(out.with_suffix(".png"), meta, summary)
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)


def regenerate(path: Path) -> None:
    """Rewrite latest.{md,json,png} from the raw runs in a results JSON (after a report change)."""
    from proxies import Proxy, all_proxies
    data = json.loads(path.read_text())
    if "proxies" in data:
        ps = [Proxy(**p) for p in data["proxies"]]
    else:  # written before the proxy list was saved: take notes and families from the runner
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            known = {p.key: p for p in all_proxies(Path(tmp), data["meta"].get("nofile", 20000))}
        ps = [Proxy(k, known[k].family if k in known else k.split("-")[0], label,
                    known[k].workers if k in known else 1, note=known[k].note if k in known else "",
                    skip=data["not_run"].get(k, "")) for k, label in data["labels"].items()]
    write(path.with_suffix(""), data["meta"], ps, data["raw"], data["errors"])


if __name__ == "__main__":
    # python bench/report.py [bench/results/latest.json]
    regenerate(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "latest.json"))
