"""Where a short connection's CPU goes: syscalls per connection, user/sys split, and a profile
split by code (kernel / interpreter / uvloop / C extensions / libc) for each proxy.

    python bench/profile.py [--sniproxy-ref HEAD] [--also old=afed3e7] [--only KEY,...]
                            [--workload short-issue] [--duration 2] [--runs 3] [--cprofile]

For every proxy selected (default: the issue-14 profile "issue-a" of sniproxy and of each
--also source, nginx and HAProxy), each run starts the proxy fresh and measures, one after
the other, each under a bounded run of the workload (64 in flight, --duration seconds):

1. plain: utime and stime of the proxy's process tree from /proc, per completed connection;
2. strace -c -f attached to every process of the tree: syscalls per connection, by name
   (strace slows the proxy a lot; the counts per connection stay what they are);
3. perf record -e cpu-clock (a software clock: this VM has no hardware counters) on the tree,
   then `perf report --sort dso`: the share of samples in the kernel, libpython (the
   interpreter), uvloop's extension (uvloop with libuv linked in), other C extensions, libc;
   and the hottest symbols;
4. with --cprofile, sniproxy only: a second instance under `python -m cProfile`, the Python
   functions that cost most, with calls per connection (py-spy cannot read this Python:
   "Failed to find python version from target process"). Strace counts epoll_wait per
   connection low: slowed down, the proxy finds more events per wait.
5. with --callgrind, the Python proxies only (sniproxy, bench/floor.py): an instance under
   ``valgrind --tool=callgrind``, counters zeroed after a warm-up, a block of the workload
   at 8 in flight, a dump: instructions per connection in user space, split by shared
   object, and the functions that ran most of them (callgrind.py). The count does not move
   with the machine's load, and is the same on another machine with the same build.

Runs of the proxies interleave (the order rotates); medians over --runs are reported.
Writes bench/results/profile.{md,json}. Every step is bounded in time; processes are
stopped by pid.
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import callgrind  # noqa: E402
import procs  # noqa: E402
import run  # noqa: E402
from provenance import header, provenance  # noqa: E402
from proxies import DNS, UPSTREAM, all_proxies  # noqa: E402

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "results" / "profile"
DEFAULT_ONLY = ["nginx-issue-a-w1", "haproxy-issue-a-w1", "sniproxy-w1-issue-a", "sniproxy-{also}-w1-issue-a"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_times(roots) -> tuple[float, float]:
    """(user, system) CPU seconds of the trees, reaped children included."""
    u = s = 0
    for pid in procs.descendants(roots):
        f = procs._stat(pid)
        if f:
            u += int(f[11]) + int(f[13])
            s += int(f[12]) + int(f[14])
    return u / CLK_TCK, s / CLK_TCK


BULK = {"push1": ("push", 1), "pull1": ("pull", 1), "push16": ("push", 16), "pull16": ("pull", 16)}


def workload(proxy, wl: str, dur: float) -> dict:
    target = f"{proxy.target[0]}:{proxy.target[1]}"
    if wl in BULK:
        mode, n = BULK[wl]
        return run.loadgen(["--mode", mode, "--target", target, "--hello", str(run.HELLOS["normal"]),
                            "--conns", str(n), "--duration", str(dur)], timeout=dur + 30)
    w = run.SHORT[wl]
    return run.loadgen(["--mode", "short", "--target", target, "--hello", str(run.HELLOS[w["hello"]]),
                        "--conns", str(run.IN_FLIGHT), "--duration", str(dur), "--no-cmd", str(int(not w["cmd"])),
                        "--server-fin", str(int(w["fin"] == "server")), "--split", str(int(w["split"]))],
                       timeout=dur + 30)


def conns(out: dict) -> float:
    """The unit everything is divided by: connections, or for bulk workloads MiB carried."""
    if out["mode"] in ("push", "pull"):
        return out["bytes_total"] / 2**20
    return out["completed"] + out.get("completed_late", 0) + out["unfinished"]


def stop(p: subprocess.Popen, sig=signal.SIGINT, timeout=20) -> None:
    if p.poll() is None:
        p.send_signal(sig)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


# ---------------------------------------------------------------- strace

_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d+)?\s*(\w+)\s*$")


def parse_strace(text: str) -> dict[str, int]:
    calls = {}
    for line in text.splitlines():
        m = _STRACE_ROW.match(line)
        if m and m.group(3) != "total":
            calls[m.group(3)] = int(m.group(1))
    return calls


def strace_run(proxy, roots, wl, dur, workdir: Path) -> dict:
    pids = procs.descendants(roots)
    threads = []
    for pid in pids:  # every thread too: HAProxy's nbthread, any helper thread
        try:
            threads += [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            pass
    out_file = workdir / "strace.txt"
    cmd = ["strace", "-c", "-f", "-o", str(out_file)] + [a for t in sorted(set(threads)) for a in ("-p", str(t))]
    st = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # attached
    try:
        out = workload(proxy, wl, dur)
    finally:
        time.sleep(0.3)
        stop(st)
    calls = parse_strace(out_file.read_text())
    n = conns(out)
    return {"conns": n, "calls": calls, "total": sum(calls.values()),
            "per_conn": sum(calls.values()) / n if n else None,
            "per_conn_by_name": {k: v / n for k, v in sorted(calls.items(), key=lambda x: -x[1])} if n else {}}


# ---------------------------------------------------------------- perf

def dso_class(dso: str) -> str:
    return callgrind.object_class(dso)


def perf_run(proxy, roots, wl, dur, workdir: Path) -> dict:
    pids = procs.descendants(roots)
    data = workdir / "perf.data"
    cmd = ["perf", "record", "-e", "cpu-clock", "-F", "4000", "-g", "-o", str(data), "-p", ",".join(map(str, pids))]
    pr = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    try:
        out = workload(proxy, wl, dur)
    finally:
        time.sleep(0.2)
        stop(pr)
    rep = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio",
                          "-q", "-g", "none", "--percent-limit", "0"],
                         capture_output=True, text=True, timeout=300)
    by_dso = {}
    for line in rep.stdout.splitlines():
        m = re.match(r"^\s*([\d.]+)%\s+(\S.*?)\s*$", line)
        if m:
            by_dso[m.group(2)] = by_dso.get(m.group(2), 0.0) + float(m.group(1))
    classes = Counter()
    for dso, pct in by_dso.items():
        classes[dso_class(dso)] += pct
    sym = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio",
                          "-q", "-g", "none", "--percent-limit", "0.7"],
                         capture_output=True, text=True, timeout=300)
    top = []
    for line in sym.stdout.splitlines():
        m = re.match(r"^\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*?)\s*$", line)
        if m:
            top.append([float(m.group(1)), m.group(2), m.group(3)])
    data.unlink(missing_ok=True)
    return {"conns": conns(out), "by_dso": by_dso, "by_class": dict(classes), "top_symbols": top[:40]}


# ---------------------------------------------------------------- cProfile

def cprofile_run(proxy, nofile, hello, wl, dur, workdir: Path) -> dict:
    """A second instance of the proxy under `python -m cProfile`: the Python functions that
    cost most per connection. A deterministic profiler inflates cheap calls, so the shares are
    an ordering, not a measurement; calls per connection are exact."""
    import copy
    import pstats
    out_file = workdir / "cprofile.out"
    out_file.unlink(missing_ok=True)
    p2 = copy.copy(proxy)
    p2.options = {**proxy.options, "cprofile": str(out_file)}
    ps = run.start_proxy(p2, nofile, hello)
    try:
        workload(p2, wl, 0.3)
        lg = workload(p2, wl, dur)
    finally:
        run.stop_procs(ps)  # SIGTERM: sniproxy drains and returns, and cProfile writes its file
    n = conns(lg)
    if not out_file.exists():
        return {"conns": n, "error": "no profile written"}
    st = pstats.Stats(str(out_file))
    total = st.total_tt
    # the profile holds the probes and the warm-up too: count connections as Connection.__init__ calls
    inits = [v[1] for (file, _, fn), v in st.stats.items() if fn == "__init__" and file.endswith("/connection.py")]
    if inits:
        n = max(inits)
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _) in st.stats.items():
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if file != "~" else "builtin"
        rows.append({"function": f"{fn} ({where})", "calls_per_conn": nc / n if n else None,
                     "self_share": tt / total if total else None, "cum_share": ct / total if total else None})
    rows.sort(key=lambda r: -(r["self_share"] or 0))
    return {"conns": n, "total_s": total, "top_self": rows[:30],
            "top_cum": sorted(rows, key=lambda r: -(r["cum_share"] or 0))[:30]}


# ---------------------------------------------------------------- callgrind

def callgrind_run(proxy, nofile, hello, wl, dur) -> dict:
    """Instructions per connection of the proxy under callgrind (see ab.py --callgrind)."""
    import ab
    workdir = run.WORK / "profile" / "callgrind"
    p = ab.side_by_side(proxy, "a", workdir)
    ps = ab.start_slow(p, nofile, hello, workdir / "a")
    try:
        run.loadgen(["--mode", "short", "--target", f"{p.target[0]}:{p.target[1]}", "--hello",
                     str(run.HELLOS["chrome"]), "--conns", "8", "--duration", "2"], timeout=120)
        b = ab.callgrind_block(p, ps[0].pid, wl, dur, workdir / "a")
    finally:
        run.stop_procs(ps)
    return {"conns": b["conns"], **callgrind.breakdown(Path(b["dump"]), b["conns"])}


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sniproxy-ref", help="sniproxy as committed at this git ref (default: installed)")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=REF")
    ap.add_argument("--only", help="comma-separated proxy keys (exact); default: the issue-a profiles")
    ap.add_argument("--workload", default="short-issue", choices=sorted(run.SHORT) + sorted(BULK),
                    help="a short workload (figures per connection) or a bulk one (figures per MiB)")
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-strace", action="store_true")
    ap.add_argument("--no-perf", action="store_true")
    ap.add_argument("--cprofile", action="store_true", help="also a run of sniproxy under cProfile")
    ap.add_argument("--callgrind", action="store_true",
                    help="also a run of each Python proxy under callgrind: instructions per connection")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (run.cleanup(), sys.exit(143)))
    run.WORK.mkdir(parents=True, exist_ok=True)
    run.build()
    nofile = run.raise_nofile()
    src = run.use_sniproxy_ref(a.sniproxy_ref)
    also = run.use_also(a.also)
    keys = a.only.split(",") if a.only else [k.format(also=n) for k in DEFAULT_ONLY for n in (also or {"": 0})
                                               if "{also}" not in k or also]
    keys = list(dict.fromkeys(keys))
    ps = {p.key: p for p in all_proxies(run.WORK, nofile)}
    chosen = [ps[k] for k in keys if k in ps and not ps[k].skip]
    for k in keys:
        if k not in ps or ps[k].skip:
            run.log(f"not run: {k}: {ps[k].skip if k in ps else 'no such key'}")
    load_start = os.getloadavg()[0]
    res: dict = {p.key: [] for p in chosen}
    errors = []
    try:
        up = run.start_helper([str(run.BUILD / "upstream"), f"{UPSTREAM[0]}:{UPSTREAM[1]}"], "upstream")
        dns = run.start_helper([sys.executable, str(BENCH / "dnsserver.py"), DNS[0], str(DNS[1]), UPSTREAM[0]], "dns")
        del up, dns
        hello = run.HELLOS["normal"].read_bytes()
        for r in range(a.runs):
            order = chosen[r % len(chosen):] + chosen[:r % len(chosen)]
            for p in order:
                run.log(f"run {r + 1}/{a.runs}: {p.key} (load average {os.getloadavg()[0]:.2f})")
                wd = run.WORK / "profile" / p.key
                wd.mkdir(parents=True, exist_ok=True)
                out = {"loadavg": os.getloadavg()[0]}
                try:
                    proc_list = run.start_proxy(p, nofile, hello)
                except RuntimeError as e:
                    errors.append(f"{p.key}: {e}")
                    continue
                try:
                    roots = [x.pid for x in proc_list]
                    workload(p, a.workload, 0.3)  # warm up (imports, caches, the first DNS lookup)
                    m0 = procs.machine_sample([os.getpid()])
                    u0, s0 = tree_times(roots)
                    lg = workload(p, a.workload, a.duration)
                    u1, s1 = tree_times(roots)
                    machine = procs.disturbance(m0, procs.machine_sample([os.getpid()]))
                    n = conns(lg)
                    out["plain"] = {"conns": n, "rate_per_s": lg.get("rate_per_s", lg.get("gib_per_s")),
                                    "errors": lg["errors"],
                                    "user_us": (u1 - u0) / n * 1e6, "sys_us": (s1 - s0) / n * 1e6,
                                    "cpu_us": (u1 - u0 + s1 - s0) / n * 1e6,
                                    "machine": machine, "disturbed": procs.disturbed(machine)}
                    if out["plain"]["disturbed"]:
                        run.log(f"  disturbed: {out['plain']['disturbed']}")
                    if not a.no_strace:
                        out["strace"] = strace_run(p, roots, a.workload, a.duration, wd)
                    if not a.no_perf:
                        out["perf"] = perf_run(p, roots, a.workload, a.duration, wd)
                except (RuntimeError, subprocess.TimeoutExpired, OSError, json.JSONDecodeError) as e:
                    errors.append(f"{p.key}: {e}")
                finally:
                    run.stop_procs(proc_list)
                if a.callgrind and p.family in ("sniproxy", "floor") and r == a.runs - 1 and a.workload in run.SHORT:
                    try:
                        out["callgrind"] = callgrind_run(p, nofile, hello, a.workload, max(a.duration, 3.0))
                    except (RuntimeError, subprocess.SubprocessError, OSError, json.JSONDecodeError) as e:
                        errors.append(f"{p.key} callgrind: {e}")
                if a.cprofile and p.family == "sniproxy" and r == a.runs - 1:
                    try:
                        out["cprofile"] = cprofile_run(p, nofile, hello, a.workload, a.duration, wd)
                    except (RuntimeError, subprocess.TimeoutExpired, OSError, json.JSONDecodeError) as e:
                        errors.append(f"{p.key} cprofile: {e}")
                res[p.key].append(out)
    finally:
        run.cleanup()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "workload": a.workload, "duration_s": a.duration,
            "runs": a.runs, "sniproxy_source": src, "also": also, "loadavg_start": load_start,
            "loadavg_end": os.getloadavg()[0], "kernel": os.uname().release,
            "short": run.SHORT.get(a.workload), "unit": "MiB" if a.workload in BULK else "conn", **provenance()}
    data = {"meta": meta, "errors": errors, "labels": {p.key: p.label for p in chosen}, "raw": res,
            "summary": summarize(res)}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(markdown(data))
    run.log(f"wrote {out}.md and {out}.json")
    return 0


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(res: dict) -> dict:
    out = {}
    for key, runs in res.items():
        s = {}
        every = [r["plain"] for r in runs if "plain" in r]
        plain = [p for p in every if not p.get("disturbed")] or every  # all disturbed: say so, use them
        s["disturbed"] = sum(1 for p in every if p.get("disturbed"))
        s["runs"] = len(every)
        s["all_disturbed"] = bool(every) and s["disturbed"] == len(every)
        for f in ("cpu_us", "user_us", "sys_us", "rate_per_s"):
            s[f] = med(p[f] for p in plain)
            s[f + "_runs"] = [p[f] for p in plain]
        st = [r["strace"] for r in runs if "strace" in r]
        if st:
            s["syscalls_per_conn"] = med(x["per_conn"] for x in st)
            s["syscalls_per_conn_runs"] = [x["per_conn"] for x in st]
            names = set().union(*(x["per_conn_by_name"] for x in st))
            s["syscalls_by_name"] = dict(sorted(((n, med(x["per_conn_by_name"].get(n, 0) for x in st)) for n in names),
                                                key=lambda kv: -kv[1]))
        pf = [r["perf"] for r in runs if "perf" in r]
        if pf:
            classes = set().union(*(x["by_class"] for x in pf))
            s["by_class"] = dict(sorted(((c, med(x["by_class"].get(c, 0) for x in pf)) for c in classes),
                                        key=lambda kv: -kv[1]))
            s["top_symbols"] = pf[-1]["top_symbols"]
        cp = [r["cprofile"] for r in runs if "cprofile" in r]
        if cp:
            s["cprofile"] = cp[-1]
        cg = [r["callgrind"] for r in runs if "callgrind" in r]
        if cg:
            s["callgrind"] = cg[-1]
        out[key] = s
    return out


def markdown(data: dict) -> str:
    m, summ, labels = data["meta"], data["summary"], data["labels"]
    nginx = next((k for k in summ if k.startswith("nginx")), None)
    unit = m.get("unit", "conn")
    L = [f"# Where the proxy's CPU goes ({m['workload']}, per {unit})\n",
         f"{m['date']} · {m['runs']} runs, medians · {m['duration_s']} s per measurement, 64 in flight · "
         f"load average {m['loadavg_start']:.2f} at start, {m['loadavg_end']:.2f} at end · sniproxy: "
         f"{m['sniproxy_source']}" + "".join(f" · sniproxy-{k}: {v}" for k, v in m["also"].items()) + "\n",
         header(m),
         "CPU from /proc (utime = user, stime = kernel) per completed connection, in a run without any tracer, "
         "median of the runs no other process disturbed (more than "
         f"{procs.MAX_OTHER_CORES} cores of other processes meanwhile: those are left out, and marked ⚠ when every "
         "run was). "
         "Syscalls: `strace -c -f` on every thread of the proxy, divided by the connections of that run. "
         "Profile: `perf record -e cpu-clock` on the proxy's processes, samples by shared object.\n",
         f"| proxy | CPU µs/{unit} | ×nginx | user µs | sys µs | user share | syscalls/{unit} |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    for k, s in summ.items():
        r = f"{s['cpu_us'] / summ[nginx]['cpu_us']:.2f}×" if nginx and s.get("cpu_us") and summ[nginx].get("cpu_us") else "–"
        sc = s.get("syscalls_per_conn")
        warn = " ⚠ every run disturbed" if s.get("all_disturbed") else (
            f" ({s['disturbed']} of {s['runs']} runs disturbed, left out)" if s.get("disturbed") else "")
        L.append(f"| {labels.get(k, k)}{warn} | {s['cpu_us']:.0f} | {r} | {s['user_us']:.0f} | {s['sys_us']:.0f} | "
                 f"{s['user_us'] / s['cpu_us']:.0%} | {'–' if sc is None else f'{sc:.1f}'} |")
    L.append("")
    L.append(f"## Syscalls per {unit}, by name (medians)\n")
    names = []
    for s in summ.values():
        for n, v in (s.get("syscalls_by_name") or {}).items():
            if v >= 0.05 and n not in names:
                names.append(n)
    L.append("| syscall | " + " | ".join(summ) + " |")
    L.append("|---|" + "---:|" * len(summ))
    for n in names:
        L.append(f"| {n} | " + " | ".join(f"{(s.get('syscalls_by_name') or {}).get(n, 0):.2f}" for s in summ.values()) + " |")
    L.append("| **total** | " + " | ".join(f"**{s['syscalls_per_conn']:.1f}**" if s.get("syscalls_per_conn") else "–"
                                            for s in summ.values()) + " |")
    L.append("")
    L.append("## Profile split (perf cpu-clock samples by shared object, % of the proxy's samples, medians)\n")
    classes = []
    for s in summ.values():
        for c in s.get("by_class") or {}:
            if c not in classes:
                classes.append(c)
    L.append("| code | " + " | ".join(summ) + " |")
    L.append("|---|" + "---:|" * len(summ))
    for c in classes:
        L.append(f"| {c} | " + " | ".join(f"{(s.get('by_class') or {}).get(c, 0):.1f}%" for s in summ.values()) + " |")
    L.append("")
    cg = {k: s["callgrind"] for k, s in summ.items() if s.get("callgrind")}
    if cg:
        classes = list(dict.fromkeys(c for x in cg.values() for c in x["by_class"]))
        L.append(f"## Instructions per {unit} in user space (callgrind, one run; 8 in flight)\n")
        L.append("The same code gives the same count on a busy machine and on another machine with the same "
                 "Python build: µs = instructions / the machine's instructions per µs. The kernel's share is "
                 "not counted.\n")
        L.append(f"| proxy | instructions/{unit} | " + " | ".join(classes) + " |")
        L.append("|---|---:|" + "---:|" * len(classes))
        for k, x in cg.items():
            L.append(f"| {labels.get(k, k)} | {x['ir_per_unit']:,.0f} | "
                     + " | ".join(f"{100 * x['by_class'].get(c, 0):.1f}%" for c in classes) + " |")
        L.append("")
        for k, x in cg.items():
            L.append(f"### Functions by their own instructions: {k} (callgrind)\n")
            L.append(f"| share | instructions/{unit} | object | function |")
            L.append("|---:|---:|---|---|")
            for share, ob, fn, per in x["top_functions"][:25]:
                L.append(f"| {100 * share:.1f}% | {per:,.0f} | {ob} | `{fn}` |")
            L.append("")
    for k, s in summ.items():
        if s.get("top_symbols"):
            L.append(f"### Hottest symbols: {k} (one run, % of its samples)\n")
            L.append("| % | object | symbol |")
            L.append("|---:|---|---|")
            for pct, dso, sym in s["top_symbols"][:25]:
                L.append(f"| {pct:.1f} | {dso} | `{sym}` |")
            L.append("")
        if s.get("cprofile", {}).get("top_self"):
            L.append(f"### Python functions: {k} (cProfile, one run; share of the profiled time, self and "
                     "cumulative; calls per connection)\n")
            L.append("| self | cumulative | calls/conn | function |")
            L.append("|---:|---:|---:|---|")
            for row in s["cprofile"]["top_self"][:25]:
                L.append(f"| {row['self_share']:.1%} | {row['cum_share']:.1%} | {row['calls_per_conn']:.2f} | "
                         f"`{row['function']}` |")
            L.append("")
            L.append(f"Cumulative, {k}:\n")
            L.append("| self | cumulative | calls/conn | function |")
            L.append("|---:|---:|---:|---|")
            for row in s["cprofile"]["top_cum"][:30]:
                L.append(f"| {row['self_share']:.1%} | {row['cum_share']:.1%} | {row['calls_per_conn']:.2f} | "
                         f"`{row['function']}` |")
            L.append("")
    if data["errors"]:
        L.append("## Errors\n")
        L += [f"- {e}" for e in data["errors"]]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
