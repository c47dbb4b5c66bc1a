"""Process bookkeeping for the benchmark: CPU and RSS of a whole process tree, and stopping it.

CPU is utime+stime (+ cutime+cstime of children already reaped) from /proc/<pid>/stat, summed
over the roots and all their descendants; RSS is VmRSS from /proc/<pid>/status, summed the same
way (shared pages count once per process, which is why the benchmark subtracts a baseline).
"""

import os
import signal
import subprocess
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    fields = data[data.rindex(b")") + 2:].split()
    return fields


def descendants(roots) -> list[int]:
    """The root pids plus every live descendant."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat(int(name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [r for r in roots if os.path.exists(f"/proc/{r}")]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu(roots) -> float:
    """CPU seconds (user+system, including reaped children) of the process trees."""
    ticks = 0
    for pid in descendants(roots):
        f = _stat(pid)
        if f:
            # after ')': state ppid ... utime=f[11] stime=f[12] cutime=f[13] cstime=f[14]
            ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def tree_rss_kib(roots) -> int:
    total = 0
    for pid in descendants(roots):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM the roots, wait, then SIGKILL whatever is left of their trees (by pid)."""
    pids = descendants([p.pid for p in procs if p.poll() is None])
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pid in pids:
        if os.path.exists(f"/proc/{pid}"):
            f = _stat(pid)
            if f and f[0] != b"Z":
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    for p in procs:
        try:
            p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass


# ---------------------------------------------------------------- precise CPU, and the machine


#: A run is disturbed when processes outside the benchmark used more CPU than this (cores)...
MAX_OTHER_CORES = 0.15
#: ... or the hypervisor stole more than this share of the machine's time.
MAX_STEAL = 0.02


def tree_runtime_s(roots) -> float:
    """CPU seconds the live threads of the process trees have run, from
    /proc/<pid>/task/<tid>/schedstat (nanoseconds, not the 10 ms ticks of /proc/<pid>/stat):
    precise enough for a block of one second. Threads that exited are not counted."""
    ns = 0
    for pid in descendants(roots):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    ns += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return ns / 1e9


def _cpu_ticks() -> list[int]:
    """The machine's "cpu" line of /proc/stat: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat", "rb") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def machine_sample(own_roots) -> dict:
    """What the machine did, to be compared with a later sample (``disturbance``): its CPU
    ticks by kind, and the ticks of the benchmark's own process trees (reaped children
    included, so a load generator that has exited still counts)."""
    return {"t": time.monotonic(), "ticks": _cpu_ticks(), "own": tree_cpu(own_roots),
            "loadavg": os.getloadavg()[0]}


def disturbance(before: dict, after: dict) -> dict:
    """Between two samples: ``other_cores``, the CPU (in cores) of every process outside the
    benchmark's trees (user + nice + system ticks of the machine, minus the benchmark's);
    ``steal``, the share of the machine's time the hypervisor gave to someone else; and the
    load average at the end. Tick counts: about 1/CLK_TCK s per CPU of error."""
    wall = max(after["t"] - before["t"], 1e-9)
    d = [b - a for a, b in zip(before["ticks"], after["ticks"])]
    user, nice, system, steal = d[0], d[1], d[2], d[7]
    total = sum(d) or 1
    own = after["own"] - before["own"]
    other = max(0.0, (user + nice + system) / CLK_TCK - own)
    return {"other_cores": other / wall, "steal": steal / total, "loadavg": after["loadavg"], "wall_s": wall}


def disturbed(d: dict, max_other: float = MAX_OTHER_CORES, max_steal: float = MAX_STEAL) -> str:
    """Why a run with this ``disturbance`` cannot be trusted, or ''."""
    why = []
    if d["other_cores"] > max_other:
        why.append(f"other processes used {d['other_cores']:.2f} cores")
    if d["steal"] > max_steal:
        why.append(f"steal {d['steal']:.1%}")
    return "; ".join(why)
