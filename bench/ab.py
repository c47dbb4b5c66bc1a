"""A/B: two proxies' CPU per short connection, resolved to a percent or two on a shared
2-core machine (issue 21: "metrics on vs off" read +14 % in one run and 1.2 % in the next).

    python bench/ab.py                       # metrics on vs off, short-issue, about 2 minutes
    python bench/ab.py --a sniproxy-w1-issue-a --b nginx-issue-a-w1
    python bench/ab.py --sniproxy-ref HEAD --also new=DIR --a sniproxy-w1-issue-a --b sniproxy-new-w1-issue-a
    python bench/ab.py --callgrind            # instructions per connection instead (sniproxy only)

Method (CPU, the default):
- A and B run side by side, each on its own port, and the load alternates between them in
  short blocks (``--block`` seconds of the workload each, ABBA order, so a slow drift of the
  machine falls on both alike). A pair is one block of each, next to each other; its ratio is
  A's CPU per connection over B's. Each round (``--rounds``) starts both proxies afresh, so a
  difference that belongs to one process (its memory layout, its hash seed) shows as spread
  between rounds instead of as a difference between A and B.
- CPU is the run time of every thread of the proxy's process tree, from
  /proc/<pid>/task/<tid>/schedstat (nanoseconds, user and kernel together), over the
  connections that block carried. Not throughput: conn/s moves with everything else on the
  machine, CPU per connection much less.
- Each block is checked for disturbance: the CPU of every process outside the benchmark's own
  trees (the machine's user + system ticks minus ours) above ``--max-other`` cores, or a
  hypervisor steal share above ``--max-steal``. A pair with a disturbed block is set aside
  (listed, not used) and run again, up to ``--max-extra`` times per round.
- The result is the median of the clean pairs' ratios, their min-max, and a 95 % interval
  of that median from a two-stage bootstrap (rounds, then pairs within each round). The
  verdict: the difference is within ``--target`` when the whole interval is; it is beyond it
  when the whole interval is; otherwise not resolved, with the interval that says how far.

``--callgrind`` counts instructions instead, for the Python proxies: each runs under
``valgrind --tool=callgrind``; after a warm-up its counters are zeroed, a block runs, and
the dump's instruction total over the block's connections is the figure. User space only
(the kernel's share is not counted), and deterministic up to how connections batch.

Writes bench/results/ab.{md,json} (``--out``), with the commit, command and machine.
Stops every process it started, by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import callgrind  # noqa: E402
import procs  # noqa: E402
import run  # noqa: E402
from paired import bootstrap_median, verdict  # noqa: E402
from provenance import header, provenance  # noqa: E402
from proxies import DNS, METRICS, PROXY, UPSTREAM, Proxy, all_proxies  # noqa: E402

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "results" / "ab"
#: A and B each listen on their own port, and serve metrics on their own port.
PORTS = {"a": (PROXY[1] + 10, METRICS[1] + 10), "b": (PROXY[1] + 11, METRICS[1] + 11)}


def log(msg: str) -> None:
    run.log(msg)


# ---------------------------------------------------------------- one block


def block(proxy: Proxy, roots: list[int], wl: str, dur: float, own: list[int]) -> dict:
    """``dur`` seconds of the short workload ``wl`` through ``proxy``: its CPU per connection
    and what the rest of the machine did meanwhile."""
    w = run.SHORT[wl]
    target = f"{proxy.target[0]}:{proxy.target[1]}"
    m0 = procs.machine_sample(own)
    c0 = procs.tree_runtime_s(roots)
    out = run.loadgen(["--mode", "short", "--target", target, "--hello", str(run.HELLOS[w["hello"]]),
                       "--conns", str(run.IN_FLIGHT), "--duration", str(dur), "--no-cmd", str(int(not w["cmd"])),
                       "--server-fin", str(int(w["fin"] == "server")), "--split", str(int(w["split"]))]
                      + (["--rate", str(w["rate"])] if w.get("rate") else []), timeout=dur + 20)
    c1 = procs.tree_runtime_s(roots)
    m1 = procs.machine_sample(own)
    n = out["completed"] + out.get("completed_late", 0) + out["unfinished"]
    return {"cpu_s": c1 - c0, "conns": n, "us_per_conn": (c1 - c0) / n * 1e6 if n else None,
            "rate_per_s": out.get("rate_per_s"), "errors": out.get("errors", 0),
            **procs.disturbance(m0, m1)}


def disturbed(b: dict, max_other: float, max_steal: float) -> str:
    """Why a block cannot be trusted, or ''."""
    why = [procs.disturbed(b, max_other, max_steal)]
    if b["errors"] or not b["us_per_conn"]:
        why.append(f"{b['errors']} load errors")
    return "; ".join(w for w in why if w)


# ---------------------------------------------------------------- callgrind


def callgrind_block(proxy: Proxy, pid: int, wl: str, dur: float, workdir: Path) -> dict:
    """Zero the counters of the proxy under callgrind, run a block, dump: instructions per
    connection over the block (the proxy's whole user space: interpreter, uvloop, libc)."""
    w = run.SHORT[wl]
    target = f"{proxy.target[0]}:{proxy.target[1]}"
    ctl = ["callgrind_control"]
    subprocess.run(ctl + ["--zero", str(pid)], capture_output=True, timeout=60, check=True)
    before = set(workdir.glob("callgrind.out.*"))
    out = run.loadgen(["--mode", "short", "--target", target, "--hello", str(run.HELLOS[w["hello"]]),
                       "--conns", "8", "--duration", str(dur), "--no-cmd", str(int(not w["cmd"])),
                       "--server-fin", str(int(w["fin"] == "server")), "--split", str(int(w["split"]))],
                      timeout=dur + 60)
    subprocess.run(ctl + ["--dump", str(pid)], capture_output=True, timeout=60, check=True)
    dumps = sorted(set(workdir.glob("callgrind.out.*")) - before, key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise RuntimeError("callgrind wrote no dump")
    n = out["completed"] + out.get("completed_late", 0) + out["unfinished"]
    try:
        ir = callgrind.total(dumps[-1])
    except ValueError as e:
        raise RuntimeError(str(e)) from None
    return {"ir": ir, "conns": n, "ir_per_conn": ir / n if n else None, "errors": out.get("errors", 0),
            "dump": str(dumps[-1])}


# ---------------------------------------------------------------- statistics


def summarize(rounds: list[list[dict]], field: str, target: float) -> dict:
    ratios = [[p["ratio"] for p in r if p["clean"]] for r in rounds]
    flat = [x for r in ratios for x in r]
    if not flat:
        return {"n": 0}
    lo, hi = bootstrap_median(ratios)
    med = statistics.median(flat)
    a = [p["a"][field] for r in rounds for p in r if p["clean"]]
    b = [p["b"][field] for r in rounds for p in r if p["clean"]]
    return {"n": len(flat), "set_aside": sum(1 for r in rounds for p in r if not p["clean"]),
            "median": med, "min": min(flat), "max": max(flat), "ci95": [lo, hi],
            "round_medians": [statistics.median(r) if r else None for r in ratios],
            "a_median": statistics.median(a), "b_median": statistics.median(b),
            "verdict": verdict(lo, hi, target)}


# ---------------------------------------------------------------- main


def choose(keys: dict[str, Proxy], key: str, side: str, callgrind: bool, workdir: Path) -> Proxy:
    p = keys.get(key)
    if p is None:
        raise SystemExit(f"no proxy {key!r}; keys: {', '.join(sorted(keys))}")
    if p.skip:
        raise SystemExit(f"{key}: {p.skip}")
    if callgrind and p.family not in ("sniproxy", "floor"):
        raise SystemExit(f"--callgrind counts the Python proxies only; {key} is {p.family}")
    return side_by_side(p, side, workdir if callgrind else None)


def side_by_side(p: Proxy, side: str, callgrind_dir: Path | None = None) -> Proxy:
    """A copy of ``p`` on side ``side``'s ports; under callgrind (dumps in callgrind_dir/side)
    when a directory is given."""
    port, mport = PORTS[side]
    opts = {**p.options, "port": port, "metrics_port": mport}
    if callgrind_dir is not None:
        opts["wrap"] = ["valgrind", "--tool=callgrind", "--vgdb=yes",
                        f"--callgrind-out-file={callgrind_dir / side / 'callgrind.out.%p'}"]
    return Proxy(f"{p.key}@{side}", p.family, p.label, p.workers, p.note, "", opts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="sniproxy-w1-splice-auto", help="proxy key A (default: metrics on)")
    ap.add_argument("--b", default="sniproxy-w1-splice-auto-nometrics", help="proxy key B (default: metrics off)")
    ap.add_argument("--workload", default="short-issue", choices=sorted(run.SHORT))
    ap.add_argument("--rounds", type=int, default=8, help="fresh A and B processes this many times (default 8)")
    ap.add_argument("--pairs", type=int, default=4, help="clean A/B pairs per round (default 4)")
    ap.add_argument("--block", type=float, default=1.0, help="seconds of load per block (default 1.0)")
    ap.add_argument("--max-other", type=float, default=procs.MAX_OTHER_CORES,
                    help="a block is disturbed when processes outside the benchmark used more than this many "
                         f"cores (default {procs.MAX_OTHER_CORES})")
    ap.add_argument("--max-steal", type=float, default=procs.MAX_STEAL,
                    help=f"... or the hypervisor stole more than this share (default {procs.MAX_STEAL})")
    ap.add_argument("--max-extra", type=int, default=4, help="pairs run again per round to replace disturbed ones")
    ap.add_argument("--target", type=float, default=0.02, help="the difference to resolve (default 0.02)")
    ap.add_argument("--callgrind", action="store_true", help="instructions per connection under callgrind")
    ap.add_argument("--sniproxy-ref", help="sniproxy as committed at this git ref (default: installed)")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=REF_OR_DIR")
    ap.add_argument("--nice", type=int, default=0, help="niceness for the runner and all it starts")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    if a.callgrind:
        a.block = max(a.block, 3.0)
    signal.signal(signal.SIGTERM, lambda *_: (run.cleanup(), sys.exit(143)))
    if a.nice:
        os.nice(a.nice)
    run.WORK.mkdir(parents=True, exist_ok=True)
    run.build()
    nofile = run.raise_nofile()
    src = run.use_sniproxy_ref(a.sniproxy_ref)
    also = run.use_also(a.also)
    workdir = run.WORK / "ab"
    keys = {p.key: p for p in all_proxies(run.WORK, nofile)}
    pa = choose(keys, a.a, "a", a.callgrind, workdir)
    pb = choose(keys, a.b, "b", a.callgrind, workdir)
    field = "ir_per_conn" if a.callgrind else "us_per_conn"
    hello = run.HELLOS["normal"].read_bytes()
    rounds: list[list[dict]] = []
    errors: list[str] = []
    t_begin = time.monotonic()
    try:
        up = run.start_helper([str(run.BUILD / "upstream"), f"{UPSTREAM[0]}:{UPSTREAM[1]}"], "upstream")
        dns = run.start_helper([sys.executable, str(BENCH / "dnsserver.py"), DNS[0], str(DNS[1]), UPSTREAM[0]], "dns")
        own = [os.getpid()]
        for r in range(a.rounds):
            pairs: list[dict] = []
            rounds.append(pairs)
            started = {}
            try:
                for side, p in (("a", pa), ("b", pb)):
                    (workdir / side).mkdir(parents=True, exist_ok=True)
                    started[side] = run.start_proxy(p, nofile, hello) if not a.callgrind else \
                        start_slow(p, nofile, hello, workdir / side)
            except RuntimeError as e:
                errors.append(f"round {r + 1}: {e}")
                for ps in started.values():
                    run.stop_procs(ps)
                continue
            try:
                roots = {s: [x.pid for x in ps] for s, ps in started.items()}
                for p in (pa, pb):  # warm-up: caches, first DNS lookup, code paths
                    run.loadgen(["--mode", "short", "--target", f"{p.target[0]}:{p.target[1]}", "--hello",
                                 str(run.HELLOS["chrome"]), "--conns", "8", "--duration",
                                 "2" if a.callgrind else "0.3"], timeout=60)
                clean = extra = 0
                k = 0
                while clean < a.pairs and extra <= a.max_extra:
                    order = ("a", "b") if k % 2 == 0 else ("b", "a")  # ABBA
                    k += 1
                    res = {}
                    for side in order:
                        p = pa if side == "a" else pb
                        if a.callgrind:
                            res[side] = callgrind_block(p, roots[side][0], a.workload, a.block, workdir / side)
                        else:
                            res[side] = block(p, roots[side], a.workload, a.block, own)
                    why = "" if a.callgrind else "; ".join(
                        f"{s}: {w}" for s in order if (w := disturbed(res[s], a.max_other, a.max_steal)))
                    ok = not why and res["a"][field] and res["b"][field]
                    pair = {"order": "".join(order), "a": res["a"], "b": res["b"], "clean": bool(ok),
                            "why": why, "ratio": res["a"][field] / res["b"][field] if ok else None}
                    pairs.append(pair)
                    clean += bool(ok)
                    extra += not ok
                    log(f"round {r + 1}/{a.rounds} pair {k}: A {res['a'][field]:,.1f} B {res['b'][field]:,.1f}"
                        + (f" ratio {pair['ratio']:.3f}" if ok else f" set aside ({why})"))
            except (RuntimeError, subprocess.SubprocessError, OSError, json.JSONDecodeError) as e:
                errors.append(f"round {r + 1}: {e}")
            finally:
                for ps in started.values():
                    run.stop_procs(ps)
        del up, dns
    except KeyboardInterrupt:
        log("interrupted; writing what was measured")
    finally:
        run.cleanup()
    result = summarize(rounds, field, a.target)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "a": pa.key.split("@")[0], "b": pb.key.split("@")[0],
            "a_label": pa.label, "b_label": pb.label, "workload": a.workload, "block_s": a.block,
            "rounds": a.rounds, "pairs_per_round": a.pairs, "max_other_cores": a.max_other,
            "max_steal": a.max_steal, "target": a.target, "measure": "callgrind" if a.callgrind else "cpu",
            "sniproxy_source": src, "also": also, "elapsed_s": round(time.monotonic() - t_begin, 1),
            "in_flight": 8 if a.callgrind else run.IN_FLIGHT, **provenance()}
    data = {"meta": meta, "result": result, "rounds": rounds, "errors": errors}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(markdown(data))
    log(f"{meta['a']} / {meta['b']}: {one_line(result)}; wrote {out}.md and {out}.json")
    return 0 if result.get("n") else 1


def start_slow(p: Proxy, nofile: int, hello: bytes, workdir: Path) -> list:
    """Start a proxy under valgrind: it takes tens of seconds to import and bind."""
    workdir.mkdir(parents=True, exist_ok=True)
    for f in workdir.glob("callgrind.out.*"):
        f.unlink()
    ps = p.start(run.WORK / p.key.replace("@", "-"), nofile)
    run._live.extend(ps)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if any(x.poll() is not None for x in ps):
            break
        if run.probe(p.target, hello, timeout=5.0):
            return ps
        time.sleep(1.0)
    run.stop_procs(ps)
    raise RuntimeError(f"{p.key} did not become ready under valgrind")


def ratio_cell(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.3f}"


def one_line(r: dict) -> str:
    if not r.get("n"):
        return "no clean pairs"
    lo, hi = r["ci95"]
    return (f"A/B median {r['median']:.3f} ({100 * (r['median'] - 1):+.1f}%), 95% interval "
            f"{lo:.3f}–{hi:.3f}, pairs {r['min']:.3f}–{r['max']:.3f}, n={r['n']} ({r['set_aside']} set aside): "
            f"{r['verdict']}")


def markdown(data: dict) -> str:
    m, r = data["meta"], data["result"]
    cg = m["measure"] == "callgrind"
    unit = "instructions/conn" if cg else "CPU µs/conn"
    L = [f"# A/B: `{m['a']}` vs `{m['b']}` ({m['workload']}, {unit})\n",
         f"{m['date']} · {m['rounds']} rounds × {m['pairs_per_round']} pairs of {m['block_s']} s blocks, "
         f"{m['in_flight']} in flight · took {m['elapsed_s']:.0f} s · sniproxy: {m['sniproxy_source']}"
         + "".join(f" · sniproxy-{k}: {v}" for k, v in m["also"].items()) + "\n",
         header(m),
         f"A: {m['a_label']}  \nB: {m['b_label']}\n",
         ("Each block: the proxy under `valgrind --tool=callgrind`, counters zeroed, the workload, a dump; "
          "instructions in user space over the block's connections.\n" if cg else
          "Each block: CPU run time of the proxy's threads (schedstat, ns) over the block's connections. A pair "
          "is an A block and a B block side by side (ABBA order); its ratio is A/B. A block is disturbed when "
          f"processes outside the benchmark used more than {m['max_other_cores']} cores or steal exceeded "
          f"{m['max_steal']:.0%}; such pairs are set aside and run again. The interval is a two-stage "
          "bootstrap (rounds, then pairs) of the median ratio.\n")]
    if not r.get("n"):
        L.append("**No clean pairs.**\n")
    else:
        fmt = (lambda v: f"{v:,.0f}") if cg else (lambda v: f"{v:.1f}")
        L += ["| figure | value |", "|---|---:|",
              f"| A, median {unit} | {fmt(r['a_median'])} |",
              f"| B, median {unit} | {fmt(r['b_median'])} |",
              f"| **A/B, median of the paired ratios** | **{r['median']:.3f} ({100 * (r['median'] - 1):+.1f}%)** |",
              f"| 95% interval of that median | {r['ci95'][0]:.3f}–{r['ci95'][1]:.3f} |",
              f"| paired ratios, min–max | {r['min']:.3f}–{r['max']:.3f} |",
              f"| per-round medians | {', '.join(f'{x:.3f}' for x in r['round_medians'] if x)} |",
              f"| clean pairs (set aside as disturbed) | {r['n']} ({r['set_aside']}) |",
              f"| verdict (target ±{m['target']:.0%}) | **{r['verdict']}** |", ""]
    f = "ir_per_conn" if cg else "us_per_conn"
    L += ["## Every pair\n"]
    if cg:
        L += ["| round | order | A | B | A/B | A conns | B conns |", "|---:|---|---:|---:|---:|---:|---:|"]
    else:
        L += ["| round | order | A | B | A/B | A conn/s | B conn/s | other cores (A, B) | steal (A, B) | set aside because |",
              "|---:|---|---:|---:|---:|---:|---:|---|---|---|"]
    for i, rnd in enumerate(data["rounds"], 1):
        for p in rnd:
            a, b = p["a"], p["b"]
            cells = f"| {i} | {p['order'].upper()} | {a[f] or 0:,.1f} | {b[f] or 0:,.1f} | {ratio_cell(p['ratio'])} | "
            if cg:
                L.append(cells + f"{a['conns']:,} | {b['conns']:,} |")
            else:
                L.append(cells + f"{a.get('rate_per_s') or 0:,.0f} | {b.get('rate_per_s') or 0:,.0f} | "
                         f"{a['other_cores']:.2f}, {b['other_cores']:.2f} | {a['steal']:.1%}, {b['steal']:.1%} | "
                         f"{p['why']} |")
    if data["errors"]:
        L += ["", "## Errors\n"] + [f"- {e}" for e in data["errors"]]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
