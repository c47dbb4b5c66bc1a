"""Benchmark runner: sniproxy vs nginx, HAProxy, the C sniproxy and a direct connection.

    python bench/run.py [--runs 3] [--quick] [--only KEY,...] [--duration S]
                        [--sniproxy-ref REF] [--also NAME=REF_OR_DIR ...] [--gap]

Builds the C load generator and upstream into bench/build/, installs what is missing (nginx,
HAProxy and Debian's sniproxy with apt-get, matplotlib with pip; it prints each command),
starts every proxy in turn, runs the workloads interleaved run after run, stops everything by
pid, and writes bench/results/latest.{md,json,png}. Every step is bounded in time.
"""

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs  # noqa: E402
import proxies  # noqa: E402
from provenance import provenance  # noqa: E402
from proxies import DNS, SYSTEM_PATH, UPSTREAM, Proxy, all_proxies, clean_env  # noqa: E402

BENCH = Path(__file__).resolve().parent
BUILD = BENCH / "build"
WORK = BENCH / "work"
RESULTS = BENCH / "results"
HELLOS = {"normal": BENCH / "hellos" / "hello-normal.bin", "pq": BENCH / "hellos" / "hello-pq.bin",
          "chrome": BENCH / "hellos" / "hello-chrome.bin"}
LOADGEN_BIND = "127.0.4.100"
IDLE_CONNS = 5000
LAT_RATE = 500  # connections/s offered in the latency test, at most 64 in flight
IN_FLIGHT = 64
SHORT_RATE = 0  # --short-rate: short workloads offered at this many connections/s (0: closed loop)

# Short-connection workloads: hello, cmd (16 B command header before the 64 B), fin ("client":
# the client closes after the echo; "server": the upstream echoes the line and closes first,
# the client closes on its FIN), split (the hello in its own write, then the 64 B).
SHORT = {
    "short-normal": dict(hello="normal", cmd=True, fin="client", split=False),
    "short-pq": dict(hello="pq", cmd=True, fin="client", split=False),
    # issue 14's workload: Chrome-shaped 517 B hello, then a 64 B line, echoed, upstream FIN first
    "short-issue": dict(hello="chrome", cmd=False, fin="server", split=True),
    # the same offered open-loop at 1,000 conn/s: little batching per event-loop turn, as in most
    # deployments, and where the Python proxies' fixed cost per turn shows
    "short-issue-r1000": dict(hello="chrome", cmd=False, fin="server", split=True, rate=1000),
    # --gap: short-issue with one thing changed towards short-normal
    "short-issue-1write": dict(hello="chrome", cmd=False, fin="server", split=False),
    "short-issue-cmd": dict(hello="chrome", cmd=True, fin="server", split=True),
    "short-issue-clientfin": dict(hello="chrome", cmd=False, fin="client", split=True),
    "short-issue-python": dict(hello="normal", cmd=False, fin="server", split=True),
}
WORKLOADS_W1 = ["push1", "pull1", "short-normal", "short-pq", "short-issue", "short-issue-r1000", "latency-normal",
                "latency-pq", "idle"]
WORKLOADS_W2 = ["push16", "pull16"]
# the metrics-off variant only runs what the "metrics on vs off" target compares
WORKLOADS_METRICS = ["push1", "pull1", "short-normal"]
# bench/floor.py, the interpreter's floor, runs the short workloads only
WORKLOADS_FLOOR = ["short-normal", "short-issue", "short-issue-r1000"]
# the issue-14 profiles (*-issue-a-*, *-issue-b-*) run the issue's workload
WORKLOADS_ISSUE = ["short-issue", "short-issue-r1000"]
# --gap: every proxy runs these (both ends and each one-change variant)
WORKLOADS_GAP = ["short-normal", "short-issue", "short-issue-1write", "short-issue-cmd", "short-issue-clientfin",
                 "short-issue-python"]

_live: list[subprocess.Popen] = []


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- setup


def build() -> None:
    BUILD.mkdir(exist_ok=True)
    for name, extra in (("upstream", []), ("loadgen", ["-lm"])):
        src, out = BENCH / f"{name}.c", BUILD / name
        if out.exists() and out.stat().st_mtime > max(src.stat().st_mtime, (BENCH / "proto.h").stat().st_mtime):
            continue
        cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)] + extra
        log("build: " + " ".join(cmd))
        subprocess.run(cmd, check=True, timeout=120)


def ensure_tools(need_apt: bool) -> None:
    missing = [pkg for pkg, probe in (("nginx", "/usr/sbin/nginx"),
                                      ("libnginx-mod-stream", "/usr/lib/nginx/modules/ngx_stream_module.so"),
                                      ("haproxy", "/usr/sbin/haproxy"), ("sniproxy", "/usr/sbin/sniproxy"))
               if not Path(probe).exists()]
    if missing and need_apt:
        cmd = ["apt-get", "install", "-y", "--no-install-recommends"] + missing
        log("install: " + " ".join(cmd))
        r = subprocess.run(cmd, timeout=600, env={**clean_env(), "DEBIAN_FRONTEND": "noninteractive"})
        if r.returncode != 0:
            log("apt-get failed; the proxies it would install are marked as not run")
    for svc in ("nginx", "haproxy", "sniproxy"):
        # the Debian packages start system services; they would hold ports and CPU
        if shutil.which("systemctl", path=SYSTEM_PATH):
            subprocess.run(["systemctl", "stop", svc], capture_output=True, timeout=30)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"]
        log("install: " + " ".join(cmd))
        subprocess.run(cmd, timeout=600)


def archive_ref(ref: str, dest: Path) -> str:
    """`git archive REF sniproxy` into dest; returns the short commit."""
    git = ["git", "-C", str(BENCH.parent)]
    commit = subprocess.run(git + ["rev-parse", "--short", ref], capture_output=True, text=True, check=True).stdout.strip()
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(git + ["archive", commit, "sniproxy"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def use_also(specs: list[str]) -> dict:
    """--also NAME=REF or NAME=DIR: another sniproxy source, benchmarked as sniproxy-NAME-*."""
    out = {}
    for spec in specs:
        name, _, what = spec.partition("=")
        if not name or not what or "-" in name:
            raise SystemExit(f"--also {spec}: expected NAME=REF or NAME=DIR (NAME without '-')")
        if Path(what).is_dir():
            path = Path(what).resolve()
            if not (path / "sniproxy").is_dir():
                raise SystemExit(f"--also {spec}: {path} has no sniproxy/ package")
            source = f"from {path}"
        else:
            path = WORK / f"sniproxy-src-{name}"
            commit = archive_ref(what, path)
            source = f"git {what} ({commit})"
        proxies.SNIPROXY_ALSO[name] = (str(path), source)
        out[name] = source
        log(f"sniproxy-{name}-*: {source}")
    return out


def use_sniproxy_ref(ref: str | None) -> str:
    """Point the proxies at `git archive REF sniproxy`; returns what is being benchmarked."""
    repo = BENCH.parent
    git = ["git", "-C", str(repo)]
    if not ref:
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "sniproxy"], capture_output=True, text=True).stdout
        return f"installed package (work tree at {head or '?'}{', sniproxy/ modified' if dirty.strip() else ''})"
    dest = WORK / "sniproxy-src"
    commit = archive_ref(ref, dest)
    proxies.SNIPROXY_PYTHONPATH = str(dest)
    log(f"sniproxy from git {ref} ({commit}) in {dest}")
    return f"git {ref} ({commit})"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (65536, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def start_helper(cmd: list[str], name: str) -> subprocess.Popen:
    """Start the upstream or DNS server and wait for its "ready" line."""
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=open(WORK / f"{name}.log", "wb"), env=clean_env(), start_new_session=True)
    _live.append(p)
    line = p.stdout.readline().decode().strip()
    if line != "ready":
        raise SystemExit(f"{name} did not start (see {WORK / (name + '.log')})")
    return p


# ---------------------------------------------------------------- probing and proxies


def probe(target, hello: bytes, timeout: float = 2.0) -> bool:
    """One end-to-end connection: hello + ack command, expect the upstream's ack byte."""
    cmd = b"SNB1A\0\0\0" + bytes(8)
    try:
        with socket.create_connection(target, timeout=timeout) as s:
            s.sendall(hello + cmd)
            return s.recv(1) == b"A"
    except OSError:
        return False


_other_hello: list[bytes] = []


def other_hello() -> bytes:
    """A real hello for a name no proxy routes."""
    if not _other_hello:
        import gen_hellos
        _other_hello.append(gen_hellos.capture_python_hello("unrouted.bench.invalid"))
    return _other_hello[0]


def start_proxy(proxy: Proxy, nofile: int, hello: bytes) -> list[subprocess.Popen]:
    ps = proxy.start(WORK / proxy.key, nofile)
    _live.extend(ps)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in ps):
            break
        if probe(proxy.target, hello, timeout=1.0):
            # and a name outside the routes must not get through: proof that it routes on SNI
            if proxy.family != "direct" and probe(proxy.target, other_hello(), timeout=2.0):
                stop_procs(ps)
                raise RuntimeError(f"{proxy.key} forwarded a hello for a name it has no route for")
            return ps
        time.sleep(0.1)
    stop_procs(ps)
    logs = sorted((WORK / proxy.key).glob("*.log"))
    tail = logs[0].read_text(errors="replace").strip().splitlines()[-3:] if logs else []
    raise RuntimeError(f"{proxy.key} did not become ready: " + " | ".join(tail))


def stop_procs(ps: list[subprocess.Popen]) -> None:
    procs.stop(ps)
    for p in ps:
        if p in _live:
            _live.remove(p)


# ---------------------------------------------------------------- workloads


def loadgen(args: list[str], timeout: float) -> dict:
    cmd = [str(BUILD / "loadgen"), "--bind", LOADGEN_BIND] + args
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env())
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"loadgen failed ({r.returncode}): {r.stderr.strip()[:300]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_workload(wl: str, proxy: Proxy, roots: list[int], upstream_pid: int, dns_pid, dur: float) -> dict:
    target = f"{proxy.target[0]}:{proxy.target[1]}"
    kind, _, arg = wl.partition("-")
    dns_roots = [dns_pid] if dns_pid and proxy.family == "sniproxy" else []
    machine0 = procs.machine_sample([os.getpid()])  # the runner's tree: every process it started
    cpu0, up0, dns0 = procs.tree_cpu(roots), procs.tree_cpu([upstream_pid]), procs.tree_cpu(dns_roots)
    t0 = time.monotonic()
    if kind in ("push1", "pull1", "push16", "pull16"):
        mode, conns = kind[:4], int(kind[4:])
        out = loadgen(["--mode", mode, "--target", target, "--hello", str(HELLOS["normal"]),
                       "--conns", str(conns), "--duration", str(dur)], timeout=dur + 20)
    elif kind == "short":
        w = SHORT[wl]
        out = loadgen(["--mode", "short", "--target", target, "--hello", str(HELLOS[w["hello"]]),
                       "--conns", str(IN_FLIGHT), "--duration", str(dur), "--no-cmd", str(int(not w["cmd"])),
                       "--server-fin", str(int(w["fin"] == "server")), "--split", str(int(w["split"]))]
                      + (["--rate", str(w.get("rate") or SHORT_RATE)] if w.get("rate") or SHORT_RATE else []),
                      timeout=dur + 20)
    elif kind == "latency":
        out = loadgen(["--mode", "latency", "--target", target, "--hello", str(HELLOS[arg]),
                       "--conns", str(IN_FLIGHT), "--rate", str(LAT_RATE), "--duration", str(dur)],
                      timeout=dur + 20)
    else:
        raise ValueError(wl)
    out["proxy_cpu_s"] = procs.tree_cpu(roots) - cpu0 if roots else None
    out["upstream_cpu_s"] = procs.tree_cpu([upstream_pid]) - up0
    out["dns_cpu_s"] = procs.tree_cpu(dns_roots) - dns0 if dns_roots else None
    out["wall_s"] = time.monotonic() - t0
    out["machine"] = procs.disturbance(machine0, procs.machine_sample([os.getpid()]))
    out["disturbed"] = procs.disturbed(out["machine"])  # '' when nothing else ran meanwhile
    if out["disturbed"]:
        log(f"  {wl}: disturbed ({out['disturbed']})")
    if kind.startswith(("push", "pull")):
        gib = out["bytes_total"] / 2**30
        out["proxy_cpu_per_gib"] = out["proxy_cpu_s"] / gib if roots and gib else None
        out["loadgen_cpu_per_gib"] = out["cpu_s"] / gib if gib else None
        out["upstream_cpu_per_gib"] = out["upstream_cpu_s"] / gib if gib else None
    elif kind == "short":
        # every connection the proxy carried: those done after the window too (their CPU is in)
        n = out["completed"] + out.get("completed_late", 0) + out["unfinished"]
        out["proxy_cpu_us_per_conn"] = out["proxy_cpu_s"] / n * 1e6 if roots and n else None
    return out


def run_idle(proxy: Proxy, nofile: int, hello: bytes, settle: float) -> dict:
    """Fresh proxy, warmed by a short burst; RSS of its tree before and with IDLE_CONNS open."""
    ps = start_proxy(proxy, nofile, hello) if proxy.family != "direct" else []
    try:
        roots = [p.pid for p in ps]
        target = f"{proxy.target[0]}:{proxy.target[1]}"
        loadgen(["--mode", "short", "--target", target, "--hello", str(HELLOS["normal"]),
                 "--conns", str(IN_FLIGHT), "--duration", "0.2"], timeout=20)
        time.sleep(settle / 2)
        base = procs.tree_rss_kib(roots)
        cmd = [str(BUILD / "loadgen"), "--bind", LOADGEN_BIND, "--mode", "idle", "--target", target,
               "--hello", str(HELLOS["normal"]), "--conns", str(IDLE_CONNS), "--timeout", "20",
               "--hold", "30"]
        lg = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=clean_env())
        try:
            ready = json.loads(lg.stdout.readline())
            time.sleep(settle)  # let the proxy settle (lazy buffers, GC)
            rss = procs.tree_rss_kib(roots)
            lg.stdin.close()
            final = json.loads(lg.stdout.readline() or "{}")
            lg.wait(timeout=30)
        finally:
            if lg.poll() is None:
                lg.kill()
                lg.wait()
        n = ready.get("ready", 0)
        return {"mode": "idle", "conns": IDLE_CONNS, "ready": n, "errors": ready.get("errors", 0),
                "dropped": final.get("dropped"), "open_s": ready.get("open_s"),
                "rss_base_kib": base, "rss_idle_kib": rss,
                "kib_per_conn": (rss - base) / n if roots and n else None}
    finally:
        stop_procs(ps)


def workloads_for(proxy: Proxy, only_wl, gap: bool = False) -> list[str]:
    if only_wl and not gap:  # asked for by name: on every proxy selected (the floor: short ones only)
        return [w for w in only_wl if (w in SHORT or w in WORKLOADS_W1 + WORKLOADS_W2 or w == "idle")
                and (proxy.family != "floor" or w in SHORT)]
    if gap:  # the workload variants on the ends; each config variant on the issue's workload
        wls = (["short-issue"] if proxy.options.get("gap_profile") else
               ["short-normal", "short-issue"] if proxy.options.get("splice") in ("on", "off") else WORKLOADS_GAP)
    elif proxy.family == "floor":  # short connections only: it is a floor, not a proxy
        wls = WORKLOADS_FLOOR
    elif proxy.key.endswith("-nometrics"):
        wls = WORKLOADS_METRICS
    elif "-issue-" in proxy.key:
        wls = WORKLOADS_ISSUE
    else:
        wls = WORKLOADS_W1 if proxy.workers == 1 else WORKLOADS_W2
    return [w for w in wls if not only_wl or w in only_wl]


def run_proxy(proxy: Proxy, nofile: int, upstream_pid: int, dns_pid, dur: float, only_wl,
              res: dict, errors: list[str], tag: str, gap: bool = False) -> None:
    """Run the proxy's workloads, adding results to res[workload] and failures to errors."""
    hello = HELLOS["normal"].read_bytes()
    wls = workloads_for(proxy, only_wl, gap)
    failures = (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError, OSError)

    def fail(what, e):
        errors.append(f"{tag} {proxy.key} {what}: {e}")
        log(f"error: {errors[-1]}")

    main_wls = [w for w in wls if w != "idle"]
    if main_wls:
        try:
            ps = start_proxy(proxy, nofile, hello) if proxy.family != "direct" else []
        except failures as e:
            fail("start", e)
            ps = None
        if ps is not None:
            try:
                roots = [p.pid for p in ps]
                for wl in main_wls:
                    try:
                        r = run_workload(wl, proxy, roots, upstream_pid, dns_pid, dur)
                    except failures as e:
                        fail(wl, e)
                        continue
                    res.setdefault(wl, []).append(r)
                    if roots and any(p.poll() is not None for p in ps):
                        fail(wl, "proxy exited")
                        break
            finally:
                stop_procs(ps)
    if "idle" in wls:
        try:
            res.setdefault("idle", []).append(run_idle(proxy, nofile, hello, settle=min(1.0, dur)))
        except failures as e:
            fail("idle", e)


def clean_pairs(results: dict, on: str, off: str) -> int:
    """Pairs (run i of both) with neither run disturbed, in the workload that has fewest."""
    counts = []
    for wl, runs_on in results[on].items():
        runs_off = results[off].get(wl, [])
        counts.append(sum(1 for x, y in zip(runs_on, runs_off) if not x.get("disturbed") and not y.get("disturbed")))
    return min(counts, default=0)


def redo_disturbed(runnable: list[Proxy], results: dict, runs: int, redo: int, nofile: int, upstream_pid: int,
                   dns_pid, dur: float, only_wl, errors: list[str]) -> None:
    """The metrics-on-vs-off pair is read run by run (run i of both saw the same machine): while
    fewer than ``runs`` of its pairs are undisturbed, run both again, interleaved, at most
    ``redo`` more times. The report leaves disturbed pairs out; these replace them."""
    on, off = "sniproxy-w1-splice-auto", "sniproxy-w1-splice-auto-nometrics"
    pair = [p for p in runnable if p.key in (on, off)]
    if len(pair) != 2:
        return
    for extra in range(redo):
        if clean_pairs(results, on, off) >= runs:
            return
        for p in (pair if extra % 2 == 0 else pair[::-1]):
            log(f"redo {extra + 1}/{redo}: {p.key} (a run of the metrics pair was disturbed)")
            run_proxy(p, nofile, upstream_pid, dns_pid, dur, only_wl, results[p.key], errors, f"redo {extra + 1}")


# ---------------------------------------------------------------- main


def cleanup(*_):
    procs.stop(list(_live), grace=3)
    _live.clear()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per proxy (median reported; default 3)")
    ap.add_argument("--quick", action="store_true", help="shorter workloads (about 3 minutes for 3 runs)")
    ap.add_argument("--duration", type=float, help="seconds per workload (default 3, --quick 0.5)")
    ap.add_argument("--only", help="comma-separated proxy keys (prefix match), e.g. direct,nginx")
    ap.add_argument("--workloads", help="comma-separated workloads, e.g. push1,short-normal")
    ap.add_argument("--in-flight", type=int, default=IN_FLIGHT,
                    help="connections in flight in the short and latency workloads (default 64)")
    ap.add_argument("--short-rate", type=float, default=0,
                    help="offer the short workloads open-loop at this many connections/s (at most --in-flight "
                         "open) instead of keeping --in-flight busy; default: closed loop")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness for the runner and all it starts, e.g. -5 on a busy machine (default 0)")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get/pip install anything")
    ap.add_argument("--sniproxy-ref", metavar="REF",
                    help="benchmark sniproxy as committed at this git ref (default: the installed package)")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=REF",
                    help="also benchmark sniproxy from this git ref or directory (holding sniproxy/), as keys "
                         "sniproxy-NAME-*: the default with 1 and 2 workers and the issue-14 profiles; "
                         "e.g. --also old=afed3e7 (repeatable)")
    ap.add_argument("--gap", action="store_true",
                    help="issue 14's gap: every proxy selected runs short-normal, short-issue and the "
                         "one-change variants between them, and the one-change sniproxy profiles are added")
    ap.add_argument("--redo", type=int, default=3,
                    help="run the metrics-on-vs-off pair again, up to this many times, while one of its runs was "
                         "disturbed by other processes (default 3)")
    ap.add_argument("--out", default=str(RESULTS / "latest"), help="output path without extension")
    a = ap.parse_args()
    dur = a.duration or (0.5 if a.quick else 3.0)
    globals()["IN_FLIGHT"] = a.in_flight  # read by the workloads
    globals()["SHORT_RATE"] = a.short_rate
    only_wl = list(dict.fromkeys(a.workloads.split(","))) if a.workloads else None

    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(143)))
    if a.nice:
        os.nice(a.nice)  # inherited by every process started below: all proxies alike
    WORK.mkdir(parents=True, exist_ok=True)
    t_begin = time.monotonic()
    load_start = os.getloadavg()[0]
    ensure_tools(need_apt=not a.no_install)
    build()
    nofile = raise_nofile()
    sniproxy_src = use_sniproxy_ref(a.sniproxy_ref)
    also = use_also(a.also)
    if nofile < 2 * IDLE_CONNS + 1000:
        log(f"warning: RLIMIT_NOFILE is {nofile}; the idle test needs {2 * IDLE_CONNS + 1000}")
    proxies = all_proxies(WORK, nofile, gap=a.gap)
    if a.only:
        keys = a.only.split(",")
        proxies = [p for p in proxies if any(p.key.startswith(k) for k in keys)]
    family_order = ["direct", "sniproxy", "floor", "nginx", "haproxy", "c-sniproxy"]
    runnable = sorted((p for p in proxies if not p.skip), key=lambda p: (p.workers, family_order.index(p.family)))
    for p in proxies:
        if p.skip:
            log(f"not run: {p.key}: {p.skip}")

    results: dict = {p.key: {} for p in runnable}
    loads: list[float] = []  # 1-minute load average before each proxy's turn
    errors: list[str] = []
    try:
        up = start_helper([str(BUILD / "upstream"), f"{UPSTREAM[0]}:{UPSTREAM[1]}"], "upstream")
        dns = None
        if any(p.family == "sniproxy" for p in runnable):
            dns = start_helper([sys.executable, str(BENCH / "dnsserver.py"), DNS[0], str(DNS[1]), UPSTREAM[0]], "dns")
        for run in range(a.runs):
            order = runnable[run % len(runnable):] + runnable[:run % len(runnable)] if runnable else []
            for p in order:
                loads.append(round(os.getloadavg()[0], 2))
                log(f"run {run + 1}/{a.runs}: {p.key} (load average {loads[-1]:.2f})")
                run_proxy(p, nofile, up.pid, dns.pid if dns else None, dur, only_wl,
                          results[p.key], errors, f"run {run + 1}", gap=a.gap)
        redo_disturbed(runnable, results, a.runs, a.redo, nofile, up.pid, dns.pid if dns else None, dur, only_wl, errors)
    except KeyboardInterrupt:
        log("interrupted; writing what was measured")
    finally:
        cleanup()

    import report  # after ensure_tools: it needs matplotlib

    meta = {"runs": a.runs, "quick": a.quick, "duration_s": dur, "idle_conns": IDLE_CONNS,
            "in_flight": a.in_flight, "short_rate": a.short_rate, "nice": a.nice, "loadavg_start": load_start, "latency_rate": LAT_RATE, "cpus": os.cpu_count(),
            "kernel": os.uname().release, "elapsed_s": round(time.monotonic() - t_begin, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "nofile": nofile,
            "versions": report.versions(), "sniproxy_source": sniproxy_src, "also": also, "gap": a.gap,
            "loadavg_end": os.getloadavg()[0], "loadavg_during": loads,
            "hello_bytes": {k: v.stat().st_size for k, v in HELLOS.items()}, "short": SHORT, **provenance()}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report.write(out, meta, proxies, results, errors)
    log(f"wrote {out}.md, {out}.json, {out}.png in {meta['elapsed_s']} s")
    return 1 if errors and not any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
