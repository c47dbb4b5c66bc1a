"""The proxies under test: config files and command lines, one class per product.

All listen on PROXY (127.0.4.1:8443), route SNI bench.example.com to UPSTREAM, and refuse any
other name. nginx, HAProxy and the C sniproxy map the name statically; the Python sniproxy
resolves upstream.bench.test through the benchmark's DNS server, as it would in production.
"""

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

PROXY = ("127.0.4.1", 8443)
UPSTREAM = ("127.0.4.2", 9000)
DNS = ("127.0.4.53", 5353)
METRICS = ("127.0.4.1", 9464)
SNI = "bench.example.com"
# [server] splice modes of the Python sniproxy; "auto" is its default
SPLICE_MODES = ("auto", "on", "off")
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Debian's C sniproxy by full path: `pip install -e .` puts our own `sniproxy` first on PATH
C_SNIPROXY = "/usr/sbin/sniproxy"


# set by run.py --sniproxy-ref: a directory holding a `git archive` of the sniproxy package
SNIPROXY_PYTHONPATH: str | None = None


def clean_env() -> dict:
    """This machine sets CA-bundle variables globally; proxies get a clean environment."""
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
    if SNIPROXY_PYTHONPATH:
        env["PYTHONPATH"] = SNIPROXY_PYTHONPATH
    return env


@dataclass
class Proxy:
    key: str  # unique id, used in results
    family: str  # direct | sniproxy | nginx | haproxy | c-sniproxy
    label: str
    workers: int
    note: str = ""
    skip: str = ""  # non-empty: could not run, and why
    options: dict = field(default_factory=dict)

    @property
    def target(self):
        return UPSTREAM if self.family == "direct" else PROXY

    def start(self, workdir: Path, nofile: int) -> list[subprocess.Popen]:
        workdir.mkdir(parents=True, exist_ok=True)
        cmds = getattr(self, f"_cmds_{self.family.replace('-', '_')}")(workdir, nofile)
        procs = []
        for i, cmd in enumerate(cmds):
            log = open(workdir / f"{self.family}-{i}.log", "wb")
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          env=clean_env(), cwd=workdir, start_new_session=True))
            log.close()
        return procs

    def _cmds_direct(self, workdir, nofile):
        return []

    def _cmds_nginx(self, workdir, nofile):
        buf = f"proxy_buffer_size {self.options['buffer']};" if self.options.get("buffer") else ""
        conf = f"""load_module {NGINX_STREAM_MODULE};
worker_processes {self.workers};
worker_rlimit_nofile {nofile};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
daemon off;
events {{ worker_connections {nofile - 100}; }}
stream {{
    map $ssl_preread_server_name $bench_upstream {{
        {SNI} {UPSTREAM[0]}:{UPSTREAM[1]};
        default 127.0.4.2:1;
    }}
    server {{
        listen {PROXY[0]}:{PROXY[1]} reuseport backlog=4096;
        ssl_preread on;
        proxy_pass $bench_upstream;
        {buf}
    }}
}}
"""
        (workdir / "nginx.conf").write_text(conf)
        return [["nginx", "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", "stderr"]]

    def _cmds_haproxy(self, workdir, nofile):
        conf = f"""global
    nbthread {self.workers}
    maxconn {nofile // 2 - 500}
    pidfile {workdir}/haproxy.pid
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend bench
    bind {PROXY[0]}:{PROXY[1]}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend upstream if {{ req.ssl_sni -i {SNI} }}
backend upstream
    server up {UPSTREAM[0]}:{UPSTREAM[1]}
"""
        (workdir / "haproxy.cfg").write_text(conf)
        return [["haproxy", "-db", "-f", str(workdir / "haproxy.cfg")]]

    def _cmds_c_sniproxy(self, workdir, nofile):
        # single-threaded; "workers" = that many processes sharing the port via SO_REUSEPORT
        cmds = []
        for i in range(self.workers):
            conf = f"""user root
pidfile {workdir}/sniproxy-{i}.pid
error_log {{
    filename {workdir}/sniproxy-{i}.err
    priority notice
}}
listener {PROXY[0]}:{PROXY[1]} {{
    protocol tls
    table bench
    reuseport yes
}}
table bench {{
    ^{SNI.replace('.', chr(92) + '.')}$ {UPSTREAM[0]}:{UPSTREAM[1]}
}}
"""
            path = workdir / f"sniproxy-{i}.conf"
            path.write_text(conf)
            cmds.append([C_SNIPROXY, "-f", "-c", str(path)])
        return cmds

    def _cmds_sniproxy(self, workdir, nofile):
        path = workdir / "sniproxy.toml"
        path.write_text(sniproxy_config(self.workers, self.options, nofile))
        return [[sys.executable, "-m", "sniproxy", "run", "--config", str(path)]]


def sniproxy_config(workers: int, options: dict, nofile: int) -> str:
    """Config for the Python sniproxy. options: splice ("auto"/"on"/"off"/None), metrics (bool),
    workers_key (bool: whether [server] workers is supported yet)."""
    # drain_timeout: the runner stops proxies between workloads and should not wait 30 s
    server = [f"max_connections = {nofile // 2 - 500}", "drain_timeout = 1.0"]
    if options.get("workers_key", True):
        server.insert(0, f"workers = {workers}")
    if options.get("splice"):
        server.append(f'splice = "{options["splice"]}"')
    metrics = f'[metrics]\naddress = "{METRICS[0]}"\nport = {METRICS[1]}\n'
    if not options.get("metrics", True):
        metrics += "enabled = false\n"
    return f"""[[listen]]
address = "{PROXY[0]}"
port = {PROXY[1]}

[resolver]
nameservers = ["{DNS[0]}"]
port = {DNS[1]}
timeout = 2.0

[server]
{chr(10).join(server)}

{metrics}
[[route]]
name = "bench"
sni = ["{SNI}"]
upstream = "upstream.bench.test"
port = {UPSTREAM[1]}
"""


def sniproxy_check(text: str, workdir: Path) -> str:
    """'' if `sniproxy check` accepts the config, else its one-line complaint."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "check.toml"
    path.write_text(text)
    try:
        r = subprocess.run([sys.executable, "-m", "sniproxy", "check", "--config-only", "--config", str(path)],
                           capture_output=True, text=True, env=clean_env(), timeout=30)
    except subprocess.TimeoutExpired:
        return "sniproxy check timed out"
    if r.returncode == 0:
        return ""
    lines = (r.stderr or r.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {r.returncode}"


def sniproxy_variants(workdir: Path, nofile: int) -> list[Proxy]:
    """Python sniproxy variants, each either runnable or marked with why it cannot run.

    Every splice mode ("auto", the default: the Protocol pump, then splice(2) once a
    connection has carried 1 MiB; "on": splice(2) right after the hello; "off": the pump only)
    with 1 and 2 workers, plus the default with metrics off for the metrics-on-vs-off target.
    `sniproxy check` tells which config keys exist yet: without [server] splice the default
    runs once per worker count and the explicit modes are marked as not run."""
    label = "sniproxy (this project)"
    try:
        r = subprocess.run([sys.executable, "-c", "import sniproxy.cli"], capture_output=True,
                           text=True, env=clean_env(), timeout=30)
        base_err = "" if r.returncode == 0 else "sniproxy not installed (pip install -e .)"
    except subprocess.TimeoutExpired:
        base_err = "import sniproxy timed out"
    check = lambda w, **o: sniproxy_check(sniproxy_config(w, o, nofile), workdir)  # noqa: E731
    if not base_err:
        base_err = check(1, workers_key=False)
    workers_ok = not base_err and not check(2)
    splice_ok = not base_err and all(not check(1, splice=m) for m in SPLICE_MODES)
    metrics_off_err = "" if base_err else check(1, workers_key=workers_ok, metrics=False)
    out = []
    for workers, metrics in ((1, True), (1, False), (2, True)):
        for splice in (SPLICE_MODES if splice_ok else (None,)):
            if not metrics and splice not in ("auto", None):
                continue
            key = f"sniproxy-w{workers}-splice-{splice or 'default'}" + ("" if metrics else "-nometrics")
            mode = {"auto": "auto (default)", None: "default"}.get(splice, splice)
            text = f"{label}, splice {mode}" + ("" if metrics else ", metrics off")
            skip, note = base_err, ""
            if not skip and workers > 1 and not workers_ok:
                note = f"ran with 1 worker: [server] workers = {workers} not accepted yet"
            if not skip and not metrics:
                skip = metrics_off_err
            opts = {"splice": splice, "metrics": metrics, "workers_key": workers_ok}
            out.append(Proxy(key, "sniproxy", text, workers, note=note, skip=skip, options=opts))
    if not splice_ok and not base_err:
        for workers in (1, 2):
            for splice in SPLICE_MODES:
                out.append(Proxy(f"sniproxy-w{workers}-splice-{splice}", "sniproxy",
                                 f"{label}, splice {splice}", workers,
                                 skip="[server] splice not supported yet"))
    return out


def all_proxies(workdir: Path, nofile: int) -> list[Proxy]:
    out = []
    for w in (1, 2):
        out.append(Proxy(f"direct-w{w}", "direct", "direct (no proxy, ceiling)", w))
        out.append(Proxy(f"nginx-default-w{w}", "nginx", "nginx stream ssl_preread, default buffers", w))
        out.append(Proxy(f"nginx-256k-w{w}", "nginx", "nginx stream ssl_preread, proxy_buffer_size 256k", w,
                         options={"buffer": "256k"}))
        out.append(Proxy(f"haproxy-w{w}", "haproxy", "HAProxy tcp mode, req.ssl_sni", w))
        out.append(Proxy(f"c-sniproxy-w{w}", "c-sniproxy", "sniproxy 0.6 (C, Debian)", w,
                         note="2 processes with reuseport" if w == 2 else ""))
    out.extend(sniproxy_variants(workdir / "sniproxy-check", nofile))
    for p in out:
        exe = {"nginx": "nginx", "haproxy": "haproxy", "c-sniproxy": C_SNIPROXY}.get(p.family)
        if exe and not shutil.which(exe, path=SYSTEM_PATH):
            p.skip = f"{exe} not installed"
        if p.family == "nginx" and not Path(NGINX_STREAM_MODULE).exists():
            p.skip = "libnginx-mod-stream not installed"
    return out
