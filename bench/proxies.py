"""The proxies under test: config files and command lines, one class per product.

All listen on PROXY (127.0.4.1:8443), route SNI bench.example.com to UPSTREAM, and refuse any
other name. nginx, HAProxy and the C sniproxy map the name statically; the Python sniproxy
resolves upstream.bench.test through the benchmark's DNS server, as it would in production,
except in the issue-14 profiles ("issue-a", "issue-b"), which route to the IP literal.

The issue-14 profiles (keys ``*-issue-a-*``, ``*-issue-b-*``), for every product alike: six
extra ECR-style routes in the table (two regions' api, dkr and s3 names, to IP literals that
are never used) and the bench route to an IP literal; "a" has the access log off, "b" on
(nginx `access_log` to a file, HAProxy `option tcplog` to stdout, sniproxy `[log] access`);
metrics on for sniproxy in both.
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
# set by run.py --also NAME=REF: NAME -> such a directory, for the keys sniproxy-NAME-*
SNIPROXY_ALSO: dict[str, tuple[str, str]] = {}  # NAME -> (directory, what it is)

# Six ECR-style routes the issue-14 profiles add: names as [ecr] generates them for two regions
# and one account, each to an IP literal on the upstream's address but a port nothing listens on.
ECR_REGIONS = ("us-east-1", "eu-west-1")
ECR_ACCOUNT = "123456789012"
ECR_UPSTREAM = ("127.0.4.3", 443)


def ecr_route_names() -> list[tuple[str, list[str]]]:
    out = []
    for region in ECR_REGIONS:
        bucket = f"prod-{region}-starport-layer-bucket"
        out += [(f"ecr-api-{region}", [f"api.ecr.{region}.amazonaws.com", f"ecr.{region}.amazonaws.com"]),
                (f"ecr-dkr-{region}", [f"{ECR_ACCOUNT}.dkr.ecr.{region}.amazonaws.com"]),
                (f"ecr-s3-{region}", [f"{bucket}.s3.{region}.amazonaws.com", f"{bucket}.s3.amazonaws.com"])]
    return out


# profile -> (IP-literal upstream, six extra routes, access log)
PROFILES = {"issue-a": (True, True, False), "issue-b": (True, True, True)}


def clean_env(pythonpath: str | None = None) -> dict:
    """This machine sets CA-bundle variables globally; proxies get a clean environment."""
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
    if pythonpath or SNIPROXY_PYTHONPATH:
        env["PYTHONPATH"] = pythonpath or SNIPROXY_PYTHONPATH
    return env


@dataclass
class Proxy:
    key: str  # unique id, used in results
    family: str  # direct | sniproxy | nginx | haproxy | c-sniproxy | floor
    label: str
    workers: int
    note: str = ""
    skip: str = ""  # non-empty: could not run, and why
    options: dict = field(default_factory=dict)

    @property
    def target(self):
        return UPSTREAM if self.family == "direct" else self.listen

    @property
    def listen(self) -> tuple[str, int]:
        """Where the proxy listens: PROXY, unless ``options["port"]`` moves it (ab.py runs two
        proxies side by side, each on its own port, with its own metrics port)."""
        return (PROXY[0], self.options.get("port") or PROXY[1])

    def start(self, workdir: Path, nofile: int) -> list[subprocess.Popen]:
        workdir.mkdir(parents=True, exist_ok=True)
        cmds = getattr(self, f"_cmds_{self.family.replace('-', '_')}")(workdir, nofile)
        procs = []
        for i, cmd in enumerate(cmds):
            cmd = self.options.get("wrap", []) + cmd  # e.g. valgrind (ab.py --callgrind)
            log = open(workdir / f"{self.family}-{i}.log", "wb")
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          env=clean_env(self.options.get("pythonpath")), cwd=workdir,
                                          start_new_session=True))
            log.close()
        return procs

    def _cmds_direct(self, workdir, nofile):
        return []

    def _cmds_nginx(self, workdir, nofile):
        buf = f"proxy_buffer_size {self.options['buffer']};" if self.options.get("buffer") else ""
        extra = "".join(f"\n        {n} {ECR_UPSTREAM[0]}:{ECR_UPSTREAM[1]};"
                        for _, names in ecr_route_names() for n in names) if self.options.get("extra_routes") else ""
        log, logfmt = "access_log off;", ""
        if extra:  # the S3 names are longer than the default bucket takes
            logfmt = "\n    map_hash_bucket_size 128;"
        if self.options.get("access_log"):
            logfmt += """
    log_format bench '{"time":"$time_iso8601","client":"$remote_addr:$remote_port","sni":"$ssl_preread_server_name",'
                     '"upstream":"$upstream_addr","bytes_to_upstream":$upstream_bytes_sent,'
                     '"bytes_to_client":$bytes_sent,"duration":$session_time,"status":$status}';"""
            log = f"access_log {workdir}/access.log bench;"
        conf = f"""load_module {NGINX_STREAM_MODULE};
worker_processes {self.workers};
worker_rlimit_nofile {nofile};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
daemon off;
events {{ worker_connections {nofile - 100}; }}
stream {{{logfmt}
    map $ssl_preread_server_name $bench_upstream {{
        {SNI} {UPSTREAM[0]}:{UPSTREAM[1]};{extra}
        default 127.0.4.2:1;
    }}
    server {{
        listen {self.listen[0]}:{self.listen[1]} reuseport backlog=4096;
        ssl_preread on;
        proxy_pass $bench_upstream;
        {log}
        {buf}
    }}
}}
"""
        (workdir / "nginx.conf").write_text(conf)
        return [["nginx", "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", "stderr"]]

    def _cmds_haproxy(self, workdir, nofile):
        routes = [("upstream", [SNI], UPSTREAM)]
        if self.options.get("extra_routes"):
            routes += [(name, names, ECR_UPSTREAM) for name, names in ecr_route_names()]
        use = "".join(f"\n    use_backend {name} if {{ req.ssl_sni -i {' '.join(names)} }}" for name, names, _ in routes)
        backends = "".join(f"backend {name}\n    server s {addr[0]}:{addr[1]}\n" for name, _, addr in routes)
        glog, dlog = "", ""
        if self.options.get("access_log"):  # stdout is the log file the runner gives every proxy
            glog = "\n    log stdout format raw local0"
            dlog = "\n    log global\n    option tcplog"
        conf = f"""global
    nbthread {self.workers}
    maxconn {nofile // 2 - 500}
    pidfile {workdir}/haproxy.pid{glog}
defaults
    mode tcp{dlog}
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend bench
    bind {self.listen[0]}:{self.listen[1]}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}{use}
{backends}"""
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
listener {self.listen[0]}:{self.listen[1]} {{
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

    def _cmds_floor(self, workdir, nofile):
        return [[sys.executable, str(Path(__file__).resolve().parent / "floor.py"), self.listen[0], str(self.listen[1]),
                 SNI, UPSTREAM[0], str(UPSTREAM[1])]]

    def _cmds_sniproxy(self, workdir, nofile):
        path = workdir / "sniproxy.toml"
        path.write_text(sniproxy_config(self.workers, {**self.options, "workdir": str(workdir)}, nofile))
        prof = ["-m", "cProfile", "-o", self.options["cprofile"]] if self.options.get("cprofile") else []
        return [[sys.executable] + prof + ["-m", "sniproxy", "run", "--config", str(path)]]


def sniproxy_config(workers: int, options: dict, nofile: int) -> str:
    """Config for the Python sniproxy. options: splice ("auto"/"on"/"off"/None), metrics (bool),
    workers_key (bool: whether [server] workers is supported yet), ip_upstream (route to the IP
    literal, not the DNS name), extra_routes (six ECR-style routes), access_log (True: to a
    file; False: "off"; absent: the default, stderr, which the runner sends to a file)."""
    # drain_timeout: the runner stops proxies between workloads and should not wait 30 s
    server = [f"max_connections = {nofile // 2 - 500}", "drain_timeout = 1.0"]
    if options.get("workers_key", True):
        server.insert(0, f"workers = {workers}")
    if options.get("splice"):
        server.append(f'splice = "{options["splice"]}"')
    metrics = f'[metrics]\naddress = "{METRICS[0]}"\nport = {options.get("metrics_port") or METRICS[1]}\n'
    if not options.get("metrics", True):
        metrics += "enabled = false\n"
    log = ""
    if "access_log" in options:
        log = f'[log]\naccess = "{options["workdir"] + "/access.log" if options["access_log"] else "off"}"\n'
    upstream = UPSTREAM[0] if options.get("ip_upstream") else "upstream.bench.test"
    extra = ""
    if options.get("extra_routes"):
        for name, names in ecr_route_names():
            extra += (f'\n[[route]]\nname = "{name}"\nsni = [{", ".join(chr(34) + n + chr(34) for n in names)}]\n'
                      f'upstream = "{ECR_UPSTREAM[0]}"\nport = {ECR_UPSTREAM[1]}\n')
    return f"""[[listen]]
address = "{PROXY[0]}"
port = {options.get("port") or PROXY[1]}

[resolver]
nameservers = ["{DNS[0]}"]
port = {DNS[1]}
timeout = 2.0

[server]
{chr(10).join(server)}

{metrics}
{log}
[[route]]
name = "bench"
sni = ["{SNI}"]
upstream = "{upstream}"
port = {UPSTREAM[1]}
{extra}"""


def sniproxy_check(text: str, workdir: Path, pythonpath: str | None = None) -> str:
    """'' if `sniproxy check` accepts the config, else its one-line complaint."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "check.toml"
    path.write_text(text)
    try:
        r = subprocess.run([sys.executable, "-m", "sniproxy", "check", "--config-only", "--config", str(path)],
                           capture_output=True, text=True, env=clean_env(pythonpath), timeout=30)
    except subprocess.TimeoutExpired:
        return "sniproxy check timed out"
    if r.returncode == 0:
        return ""
    lines = (r.stderr or r.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {r.returncode}"


def sniproxy_variants(workdir: Path, nofile: int, name: str = "", pythonpath: str | None = None,
                      source: str = "", gap: bool = False) -> list[Proxy]:
    """Python sniproxy variants, each either runnable or marked with why it cannot run.

    The main source (``name`` ""): every splice mode ("auto", the default: copy, then
    splice(2) once a direction has carried ``splice_after`` bytes; "on": splice(2) right
    after the hello; "off": copy only) with 1 and 2 workers, the default with metrics off for
    the metrics-on-vs-off target, and the issue-14 profiles. Another source (``--also
    NAME=REF``, keys ``sniproxy-NAME-*``): the default with 1 and 2 workers and the issue-14
    profiles. ``gap``: also the one-change-at-a-time profiles that explain issue 14's
    2.7x-vs-3.5-4.5x gap (see run.py --gap).
    `sniproxy check` tells which config keys exist yet: without [server] splice the default
    runs once per worker count and the explicit modes are marked as not run."""
    label = "sniproxy" + (f" {source}" if source else " (this project)")
    prefix = f"sniproxy-{name}-" if name else "sniproxy-"
    env = clean_env(pythonpath)
    try:
        r = subprocess.run([sys.executable, "-c", "import sniproxy.cli"], capture_output=True,
                           text=True, env=env, timeout=30)
        base_err = "" if r.returncode == 0 else "sniproxy not importable (pip install -e . or a bad --also source)"
    except subprocess.TimeoutExpired:
        base_err = "import sniproxy timed out"
    check = lambda w, **o: sniproxy_check(sniproxy_config(w, {"workdir": str(workdir), **o}, nofile),  # noqa: E731
                                          workdir, pythonpath)
    if not base_err:
        base_err = check(1, workers_key=False)
    workers_ok = not base_err and not check(2)
    splice_ok = not base_err and all(not check(1, splice=m) for m in SPLICE_MODES)
    metrics_off_err = "" if base_err else check(1, workers_key=workers_ok, metrics=False)
    out = []
    rows = ((1, True), (1, False), (2, True)) if not name else ((1, True), (2, True))
    for workers, metrics in rows:
        for splice in (SPLICE_MODES if splice_ok else (None,)):
            if (not metrics or (name and not (gap and workers == 1))) and splice not in ("auto", None):
                continue
            key = f"{prefix}w{workers}-splice-{splice or 'default'}" + ("" if metrics else "-nometrics")
            mode = {"auto": "auto (default)", None: "default"}.get(splice, splice)
            text = f"{label}, splice {mode}" + ("" if metrics else ", metrics off")
            skip, note = base_err, ""
            if not skip and workers > 1 and not workers_ok:
                note = f"ran with 1 worker: [server] workers = {workers} not accepted yet"
            if not skip and not metrics:
                skip = metrics_off_err
            opts = {"splice": splice, "metrics": metrics, "workers_key": workers_ok, "pythonpath": pythonpath}
            out.append(Proxy(key, "sniproxy", text, workers, note=note, skip=skip, options=opts))
    if not splice_ok and not base_err and not name:
        for workers in (1, 2):
            for splice in SPLICE_MODES:
                out.append(Proxy(f"{prefix}w{workers}-splice-{splice}", "sniproxy",
                                 f"{label}, splice {splice}", workers,
                                 skip="[server] splice not supported yet"))
    # issue 14's profiles; with gap, one change at a time from "issue-a" towards the bench's own
    profiles = {"issue-a": ("IP-literal upstream, 6 extra routes, metrics on, access log off",
                            dict(ip_upstream=True, extra_routes=True, access_log=False)),
                "issue-b": ("IP-literal upstream, 6 extra routes, metrics on, access log on",
                            dict(ip_upstream=True, extra_routes=True, access_log=True))}
    if gap:
        profiles.update({
            "issue-a-dns": ("as issue-a but the upstream by DNS name",
                            dict(ip_upstream=False, extra_routes=True, access_log=False)),
            "issue-a-1route": ("as issue-a but the bench route only",
                               dict(ip_upstream=True, extra_routes=False, access_log=False)),
            "issue-a-nometrics": ("as issue-a but metrics off",
                                  dict(ip_upstream=True, extra_routes=True, access_log=False, metrics=False)),
            "issue-a-stderrlog": ("as issue-a but the access log on stderr (the default; to a file here)",
                                  dict(ip_upstream=True, extra_routes=True)),
        })
    for profile, (what, opts) in profiles.items():
        skip = base_err or check(1, workers_key=workers_ok, **opts)
        out.append(Proxy(f"{prefix}w1-{profile}", "sniproxy", f"{label}: {what}", 1, skip=skip,
                         options={"splice": "auto" if splice_ok else None, "metrics": True,
                                  "workers_key": workers_ok, "pythonpath": pythonpath,
                                  "gap_profile": profile != "issue-a", **opts}))
    return out


def all_proxies(workdir: Path, nofile: int, gap: bool = False) -> list[Proxy]:
    out = []
    for w in (1, 2):
        out.append(Proxy(f"direct-w{w}", "direct", "direct (no proxy, ceiling)", w))
        out.append(Proxy(f"nginx-default-w{w}", "nginx", "nginx stream ssl_preread, default buffers", w))
        out.append(Proxy(f"nginx-256k-w{w}", "nginx", "nginx stream ssl_preread, proxy_buffer_size 256k", w,
                         options={"buffer": "256k"}))
        out.append(Proxy(f"haproxy-w{w}", "haproxy", "HAProxy tcp mode, req.ssl_sni", w))
        out.append(Proxy(f"c-sniproxy-w{w}", "c-sniproxy", "sniproxy 0.6 (C, Debian)", w,
                         note="2 processes with reuseport" if w == 2 else ""))
    for profile, (_, extra, access) in PROFILES.items():
        what = "6 extra routes, access log " + ("on" if access else "off")
        out.append(Proxy(f"nginx-{profile}-w1", "nginx", f"nginx ssl_preread, default buffers: {what}", 1,
                         options={"extra_routes": extra, "access_log": access}))
        out.append(Proxy(f"haproxy-{profile}-w1", "haproxy", f"HAProxy req.ssl_sni: {what}", 1,
                         options={"extra_routes": extra, "access_log": access}))
    out.append(Proxy("floor-w1", "floor", "the Python floor: a minimal SNI proxy in pure Python (bench/floor.py), "
                     "the same system calls, no features", 1))
    if gap:
        out.append(Proxy("nginx-issue-a-w2", "nginx", "nginx ssl_preread, default buffers: 6 extra routes, "
                         "access log off, worker_processes 2 (Debian's nginx.conf says auto)", 2,
                         options={"extra_routes": True, "access_log": False}))
    out.extend(sniproxy_variants(workdir / "sniproxy-check", nofile, gap=gap))
    for name, (path, source) in SNIPROXY_ALSO.items():
        out.extend(sniproxy_variants(workdir / f"sniproxy-{name}-check", nofile, name, path, source, gap=gap))
    for p in out:
        exe = {"nginx": "nginx", "haproxy": "haproxy", "c-sniproxy": C_SNIPROXY}.get(p.family)
        if exe and not shutil.which(exe, path=SYSTEM_PATH):
            p.skip = f"{exe} not installed"
        if p.family == "nginx" and not Path(NGINX_STREAM_MODULE).exists():
            p.skip = "libnginx-mod-stream not installed"
    return out
