"""`sniproxy check|hosts`: the main cases as real `python -m sniproxy` subprocesses with a clean
environment, all started at once so their ~0.3 s start-ups overlap; the many bad-input variants
through ``cli.main(argv)`` in-process, which runs the same code minus the interpreter start.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from sniproxy.config import system_nameservers
from tests.helpers import REPO, clean_env, free_port

GOOD = """
[[listen]]
address = "10.0.1.10"
[[listen]]
address = "2001:db8::10"
port = 8443
[resolver]
nameservers = ["127.0.0.53", "::1"]
timeout = 1.5
[[route]]
name = "mirror"
sni = ["registry.example.com", "*.mirror.example.com"]
upstream = "vpce-0123.example.org"
port = 8443
[ecr]
region = "us-east-1"
accounts = ["123456789012", "210987654321"]
"""

GOOD_NAMES = [
    "registry.example.com",
    "api.ecr.us-east-1.amazonaws.com",
    "ecr.us-east-1.amazonaws.com",
    "123456789012.dkr.ecr.us-east-1.amazonaws.com",
    "210987654321.dkr.ecr.us-east-1.amazonaws.com",
    "prod-us-east-1-starport-layer-bucket.s3.us-east-1.amazonaws.com",
    "prod-us-east-1-starport-layer-bucket.s3.amazonaws.com",
]

WILD_LISTENERS = """
[[listen]]
address = "0.0.0.0"
[[listen]]
address = "::"
[resolver]
nameservers = ["127.0.0.53"]
[[route]]
name = "r"
sni = "a.example.com"
"""

OK_TAIL = '[resolver]\nnameservers = ["127.0.0.53"]\n[[route]]\nname = "r"\nsni = "a.example.com"\n'

FILES: dict[str, str | bytes] = {
    "good.toml": GOOD,
    "wild.toml": WILD_LISTENERS,
    "unknown_key.toml": '[[listen]]\naddress = "10.0.0.1"\nadress = "10.0.0.2"\n' + OK_TAIL,
    "string_port.toml": '[[listen]]\naddress = "10.0.0.1"\nport = "443"\n' + OK_TAIL,
    "no_route.toml": '[[listen]]\naddress = "10.0.0.1"\n[resolver]\nnameservers = ["127.0.0.53"]\n',
    "dup_sni.toml": '[[listen]]\naddress = "10.0.0.1"\n' + OK_TAIL + '[[route]]\nname = "s"\nsni = "A.example.com"\n',
    "invalid.toml": '[[listen]\naddress = "10.0.0.1"\n',
    "not_utf8.toml": b"# caf\xe9\n" + ('[[listen]]\naddress = "10.0.0.1"\n' + OK_TAIL).encode(),
    "huge_int.toml": '[[listen]]\naddress = "10.0.0.1"\n[server]\nidle_timeout = 1' + "0" * 400 + "\n" + OK_TAIL,
}

# name -> argv after "python -m sniproxy"; "{d}" is the temp directory
ARGV = {
    # --config-only: the listeners are another host's addresses
    "check_good": ["check", "--config-only", "--config", "{d}/good.toml"],
    "hosts_good": ["hosts", "--config", "{d}/good.toml", "--address", "10.9.9.9"],
    "hosts_default_address": ["hosts", "-c", "{d}/good.toml"],
    "hosts_wild_listeners": ["hosts", "--config", "{d}/wild.toml"],
    "hosts_bad_address": ["hosts", "--config", "{d}/good.toml", "--address", "proxy.example.com"],
    "check_region": ["check", "--config-only", "--region", "us-east-1", "--account", "123456789012", "--account",
                     "210987654321"],
    "check_region_port": ["check", "--config-only", "--region", "us-east-1", "--account", "123456789012", "--account",
                          "210987654321", "--port", "8443"],
    "region_without_account": ["check", "--region", "us-east-1"],
    "config_and_port": ["check", "--config", "{d}/good.toml", "--port", "8443"],
    "bad_port": ["check", "--region", "us-east-1", "--account", "123456789012", "--port", "0"],
    "config_and_region": ["check", "--config", "{d}/good.toml", "--region", "us-east-1", "--account", "123456789012"],
    "bad_region": ["hosts", "--region", "mars-north-1", "--account", "123456789012", "--address", "10.0.0.1"],
    "bad_account": ["check", "--region", "us-east-1", "--account", "1234"],
    "unknown_key": ["check", "--config", "{d}/unknown_key.toml"],
    "string_port": ["check", "--config", "{d}/string_port.toml"],
    "no_route": ["hosts", "--config", "{d}/no_route.toml", "--address", "10.0.0.1"],
    "dup_sni": ["check", "--config", "{d}/dup_sni.toml"],
    "invalid_toml": ["check", "--config", "{d}/invalid.toml"],
    "missing_file": ["check", "--config", "{d}/absent.toml"],
    "not_utf8": ["check", "--config", "{d}/not_utf8.toml"],
    "huge_int": ["check", "--config", "{d}/huge_int.toml"],
}
# these also run as subprocesses; every case runs in-process
SUBPROCESS = ["check_good", "hosts_good", "check_region", "unknown_key", "hosts_bad_address", "invalid_toml",
              "not_utf8"]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def tmpdir_cli(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    for name, content in FILES.items():
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return d


def collect(procs: dict[str, subprocess.Popen], timeout: float, late: str = "") -> dict[str, Run]:
    """Wait for processes started together; one still running after ``timeout`` is killed,
    and its stderr says so. None is left behind, whatever happens."""
    results = {}
    try:
        for name, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err += f"\n<still running after {timeout:g} s: {late or 'it did not exit'}>"
            results[name] = Run(proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.fixture(scope="module")
def subprocess_runs(tmpdir_cli) -> dict[str, Run]:
    d = tmpdir_cli
    # a clean environment: this machine sets SSL/AWS variables globally
    env = {"PATH": "/usr/bin:/bin", "HOME": str(d), "LANG": "C.UTF-8", "PYTHONPATH": str(REPO),
           "PYTHONDONTWRITEBYTECODE": "1"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "sniproxy", *(a.format(d=d) for a in ARGV[name])],
            cwd=d, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name in SUBPROCESS
    }
    return collect(procs, timeout=60)


@pytest.fixture
def cli(request, tmpdir_cli, capsys):
    """cli(mode, name): run a case in-process through ``cli.main`` or as ``python -m sniproxy``."""
    from sniproxy.cli import main

    def run(mode: str, name: str) -> Run:
        if mode == "subprocess":
            return request.getfixturevalue("subprocess_runs")[name]
        capsys.readouterr()
        code = main([a.format(d=tmpdir_cli) for a in ARGV[name]])
        out, err = capsys.readouterr()
        return Run(code, out, err)

    return run


def modes(*names: str, **extra):
    """Parameters (mode, name, *extra values): every case in-process, the SUBPROCESS ones also for real."""
    return [
        pytest.param(mode, name, *extra.get(name, ()), id=f"{mode}-{name}")
        for name in names
        for mode in ("in-process", "subprocess")
        if mode == "in-process" or name in SUBPROCESS
    ]


def one_line_error(run: Run, *fragments: str) -> str:
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert run.returncode != 0
    assert run.stdout == ""
    line = lines[0]
    assert line.startswith("config error: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


#: What `check` prints for the [ecr] routes of us-east-1 with the two test accounts.
ECR_ROUTE_LINES = [
    "  ecr-api -> <sni>:443",
    "    api.ecr.us-east-1.amazonaws.com",
    "    ecr.us-east-1.amazonaws.com",
    "  ecr-dkr -> <sni>:443",
    "    123456789012.dkr.ecr.us-east-1.amazonaws.com",
    "    210987654321.dkr.ecr.us-east-1.amazonaws.com",
    "  ecr-s3 -> <sni>:443",
    "    prod-us-east-1-starport-layer-bucket.s3.us-east-1.amazonaws.com",
    "    prod-us-east-1-starport-layer-bucket.s3.amazonaws.com",
]


@pytest.mark.parametrize("mode, name", modes("check_good"))
def test_check_good_config(cli, tmpdir_cli, mode, name):
    r = cli(mode, name)
    assert (r.returncode, r.stderr) == (0, "")
    lines = r.stdout.splitlines()
    assert lines[:7] == [
        f"config {tmpdir_cli}/good.toml: ok",
        "listeners:",
        "  10.0.1.10:443",
        "  [2001:db8::10]:8443",
        "resolver: 127.0.0.53, ::1 port 53 timeout 1.5s",
        "metrics: http://127.0.0.1:9464/metrics",
        "routes:",
    ]
    assert lines[7:] == [
        "  mirror -> vpce-0123.example.org:8443",
        "    registry.example.com",
        "    *.mirror.example.com",
    ] + ECR_ROUTE_LINES


def host_lines(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize(
    "mode, name, address",
    modes("hosts_good", "hosts_default_address", hosts_good=["10.9.9.9"], hosts_default_address=["10.0.1.10"]),
)
def test_hosts(cli, mode, name, address):
    r = cli(mode, name)
    assert (r.returncode, r.stderr) == (0, "")
    assert host_lines(r.stdout) == [[address, n] for n in GOOD_NAMES]
    comments = [line for line in r.stdout.splitlines() if line.startswith("#")]
    assert len(comments) == 2  # the header, and the one wildcard
    assert "*.mirror.example.com" in comments[1] and "mirror" in comments[1]
    assert "*" not in "".join(" ".join(h) for h in host_lines(r.stdout))


@pytest.mark.skipif(not system_nameservers(), reason="/etc/resolv.conf lists no nameserver, and --region has no "
                    "way to name another resolv.conf")
@pytest.mark.parametrize("mode, name, port", modes("check_region", "check_region_port", check_region=["443"],
                                                   check_region_port=["8443"]))
def test_check_region_and_accounts(cli, mode, name, port):
    """--port moves the listeners of --region, as a container's non-root user needs."""
    r = cli(mode, name)
    assert r.returncode == 0
    assert [line.split(" is on ")[0] for line in r.stderr.splitlines()] == [
        f"warning: listener 0.0.0.0:{port}", f"warning: listener [::]:{port}"]
    lines = r.stdout.splitlines()
    assert lines[0] == "config --region/--account: ok"
    assert lines[1:4] == ["listeners:", f"  0.0.0.0:{port}", f"  [::]:{port}"]
    assert lines[lines.index("routes:") + 1 :] == ECR_ROUTE_LINES


BAD_INPUT = {
    "unknown_key": ["config error: listen[0].adress: unknown key"],
    "string_port": ["config error: listen[0].port: "],
    "no_route": ["config error: route: "],
    "dup_sni": ["config error: route[1].sni: ", "a.example.com"],
    "invalid_toml": ["invalid.toml: invalid TOML"],
    "missing_file": ["absent.toml: no such file"],
    "bad_region": ["config error: ecr.region: "],
    "bad_account": ["config error: ecr.accounts: "],
    "hosts_wild_listeners": ["--address"],
    "hosts_bad_address": ["proxy.example.com", "not an IP address"],
    "region_without_account": ["--region and --account"],
    "config_and_region": ["--config", "--region"],
    "config_and_port": ["--port goes with --region"],
    "bad_port": ["config error: listen[0].port: "],
}


@pytest.mark.parametrize("mode, name, fragments", modes(*BAD_INPUT, **{k: [v] for k, v in BAD_INPUT.items()}))
def test_bad_input_is_one_line(cli, mode, name, fragments):
    r = cli(mode, name)
    one_line_error(r, *fragments)
    assert r.returncode == 2


@pytest.mark.parametrize("mode, name, key", modes("not_utf8", "huge_int", not_utf8=["not_utf8.toml"],
                                                   huge_int=["server.idle_timeout"]))
def test_bad_input_is_one_line_known_bugs(cli, mode, name, key):
    one_line_error(cli(mode, name), key)


# -- startup failures: `check` finds each one first, and `run` reports it in one line ----------------

BOTOCORE = __import__("botocore").__version__


def _config(listen: str, extra: str = "", metrics_port: int | None = None) -> str:
    """A config that passes everything but ``extra``; ``listen`` is "address:port"."""
    address, port = listen.rsplit(":", 1)
    metrics = f"[metrics]\nport = {metrics_port or free_port()}\n" if "[metrics]" not in extra else ""
    body = f'[[listen]]\naddress = "{address}"\nport = {port}\n[resolver]\nnameservers = ["127.0.0.53"]\n{metrics}{extra}\n'
    if "[ecr]" not in extra:
        body += '[[route]]\nname = "r"\nsni = "a.example.com"\n'
    return body


@dataclass
class Case:
    config: str
    check: str  # the line `check` prints
    run: str  # the line `run` prints
    root_only_run: bool = False  # only root has to switch user, so only root fails


@pytest.fixture(scope="module")
def held() -> int:
    """A port held by this (non-sniproxy) process."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


@pytest.fixture(scope="module")
def cases(tmp_path_factory, held) -> tuple[Path, dict[str, Case]]:
    d = tmp_path_factory.mktemp("startup")
    pid = os.getpid()
    port = free_port()  # for the cases refused before any listener binds; the others get their own
    # [log] level = "error": the root warning and info lines must not hide a second report of the failure
    quiet = '[log]\nlevel = "error"\n'
    table = {
        "metrics_in_use": Case(
            _config(f"127.0.0.1:{free_port()}", quiet, metrics_port=held),
            f"sniproxy: cannot serve metrics on 127.0.0.1:{held}: in use by pid {pid} (",
            f"sniproxy: cannot serve metrics on 127.0.0.1:{held}: Address already in use"),
        "listener_in_use": Case(
            _config(f"127.0.0.1:{held}", quiet),
            f"sniproxy: cannot listen on 127.0.0.1:{held} (listen[0]): in use by pid {pid} (",
            f"sniproxy: cannot listen on 127.0.0.1:{held}: Address already in use (sniproxy check names the process"),
        "metrics_on_the_listener": Case(
            _config(f"127.0.0.1:{port}", quiet + f"[metrics]\nport = {port}\n"),
            f"config error: metrics.port: metrics on 127.0.0.1:{port} would take listen[0]'s 127.0.0.1:{port}",
            f"config error: metrics.port: metrics on 127.0.0.1:{port} would take listen[0]'s 127.0.0.1:{port}"),
        "error_log_directory_missing": Case(
            _config(f"127.0.0.1:{free_port()}", quiet + f'error = "{d}/absent/error.log"\n'),
            f"config error: log.error: {d}/absent/error.log: cannot create it: {d}/absent does not exist",
            f"sniproxy: cannot open log file {d}/absent/error.log: No such file or directory"),
        "access_log_is_a_directory": Case(
            _config(f"127.0.0.1:{free_port()}", quiet + f'access = "{d}"\n'),
            f"config error: log.access: {d}: is a directory",
            f"sniproxy: cannot open access log {d}: Is a directory"),
        "no_such_user": Case(
            _config(f"127.0.0.1:{free_port()}", quiet + '[server]\nuser = "sniproxy-no-such-user"\n'),
            "config error: server.user: user 'sniproxy-no-such-user' does not exist",
            "sniproxy: user 'sniproxy-no-such-user' does not exist", root_only_run=True),
        "no_such_group": Case(
            _config(f"127.0.0.1:{free_port()}", quiet + '[server]\nuser = "nobody"\ngroup = "sniproxy-no-such-group"\n'),
            "config error: server.group: group 'sniproxy-no-such-group' does not exist",
            "sniproxy: group 'sniproxy-no-such-group' does not exist", root_only_run=True),
        "region_typo": Case(
            _config(f"127.0.0.1:{port}", quiet + '[ecr]\nregion = "eu-wst-2"\naccounts = ["123456789012"]\n'),
            f"config error: ecr.region: 'eu-wst-2' is not a region botocore {BOTOCORE} knows (did you mean eu-west-2?)",
            f"config error: ecr.region: 'eu-wst-2' is not a region botocore {BOTOCORE} knows (did you mean eu-west-2?)"),
        "port_443_unprivileged": Case(
            _config("127.0.0.1:443", quiet),
            "sniproxy: cannot listen on 127.0.0.1:443 (listen[0]): Permission denied (ports below 1024 need root, "
            "CAP_NET_BIND_SERVICE, or the socket unit: sniproxy files sniproxy.socket)",
            "sniproxy: cannot listen on 127.0.0.1:443: Permission denied (ports below 1024 need root, "
            "CAP_NET_BIND_SERVICE, or the socket unit: sniproxy files sniproxy.socket)"),
    }
    for name, case in table.items():
        (d / f"{name}.toml").write_text(case.config)
    return d, table


def unprivileged() -> list[str]:
    """A prefix that runs a command without the right to bind ports below 1024."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv not installed (Debian: util-linux)")
    return [setpriv, "--bounding-set=-net_bind_service", "--"]


def sniproxy(*argv: str, prefix: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*(prefix or []), sys.executable, "-m", "sniproxy", *argv], env=clean_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


STARTUP = ["metrics_in_use", "listener_in_use", "metrics_on_the_listener", "error_log_directory_missing",
           "access_log_is_a_directory", "no_such_user", "no_such_group", "region_typo", "port_443_unprivileged"]


@pytest.mark.parametrize("name", STARTUP)
def test_check_finds_each_startup_failure(cases, name, capsys):
    d, table = cases
    case = table[name]
    if name == "port_443_unprivileged":
        proc = sniproxy("check", "--quiet", "--config", str(d / f"{name}.toml"), prefix=unprivileged())
        out, err = proc.communicate(timeout=60)
        code = proc.returncode
    else:
        from sniproxy.cli import main

        capsys.readouterr()
        code = main(["check", "--quiet", "--config", str(d / f"{name}.toml")])
        out, err = capsys.readouterr()
    assert (code, out) == (2, ""), err
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith(case.check), err


@pytest.fixture(scope="module")
def run_results(cases) -> dict[str, Run]:
    """`sniproxy run` on every bad config at once (each would serve, were it not refused)."""
    d, table = cases
    procs = {name: sniproxy("run", "--config", str(d / f"{name}.toml"),
                            prefix=unprivileged() if name == "port_443_unprivileged" else None) for name in STARTUP}
    return collect(procs, timeout=30, late="the bad config was not refused")


@pytest.mark.parametrize("name", STARTUP)
def test_run_reports_each_startup_failure_in_one_line(cases, run_results, name):
    case = cases[1][name]
    if case.root_only_run and os.geteuid() != 0:
        pytest.skip("only root switches user, so only root fails on an unknown one")
    r = run_results[name]
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(case.run), r.stderr


def test_check_warns_on_stderr_and_quiet_prints_nothing(tmp_path, capsys):
    """A region newer than this botocore is a warning, not an error: check passes and says so."""
    from sniproxy.cli import main

    path = tmp_path / "new.toml"
    path.write_text(_config(f"127.0.0.1:{free_port()}", '[ecr]\nregion = "ap-east-9"\naccounts = ["123456789012"]\n'))
    capsys.readouterr()
    assert main(["check", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"config {path}: ok\n")
    assert err == (f"warning: ecr.region: 'ap-east-9' is not a region botocore {BOTOCORE} knows, but is named like a new "
                   "one of partition aws: if it is new, upgrade botocore (pip install -U botocore); if not, check the "
                   "spelling\n")
    assert main(["check", "--quiet", "--config", str(path)]) == 0
    assert capsys.readouterr() == ("", "")


def test_check_and_run_warn_when_max_connections_exceed_the_descriptor_limit(tmp_path):
    """Under `prlimit --nofile=256`: the default max_connections of 10,000 would hit EMFILE."""
    path = tmp_path / "c.toml"
    path.write_text(_config(f"127.0.0.1:{free_port()}"))
    out = subprocess.run(["prlimit", "--nofile=256:256", sys.executable, "-m", "sniproxy", "check", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, env=clean_env())
    assert out.returncode == 0, out.stderr
    assert ("warning: server.max_connections 10000 needs 20000 descriptors per process (2 sockets a connection; "
            "splicing directions take 4 more while they can), but RLIMIT_NOFILE is 256") in out.stderr


# -- logs, --version, files -----------------------------------------------------------------------------

@pytest.mark.parametrize("journal, stamped", [("match", False), ("other", True), ("unset", True), ("garbage", True)])
def test_stderr_lines_carry_a_timestamp_except_on_journald(tmp_path, monkeypatch, journal, stamped):
    import logging

    from sniproxy.config import LogConfig
    from sniproxy.observe.logs import setup_logging

    stream = open(tmp_path / "stderr", "w+")
    monkeypatch.setattr(sys, "stderr", stream)
    st = os.fstat(stream.fileno())
    environ = {"match": {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},  # systemd.exec(5)
               "other": {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"},  # stderr was redirected
               "unset": {}, "garbage": {"JOURNAL_STREAM": "x"}}[journal]
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(LogConfig(), environ=environ)
        logging.getLogger("sniproxy").info("ready")
        for handler in root.handlers:
            handler.flush()
    finally:
        root.handlers[:], root.level = saved
    line = (tmp_path / "stderr").read_text()
    if stamped:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO sniproxy: ready\n", line), line
    else:
        assert line == "INFO sniproxy: ready\n"


def test_version(capsys):
    from sniproxy.cli import main
    from sniproxy.process.lifecycle import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"sniproxy {version()}\n"


def test_files_lists_and_prints_the_shipped_files(capsys):
    from sniproxy.cli import main

    capsys.readouterr()
    assert main(["files"]) == 0
    listed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    names = {p.name for p in listed}
    assert {"sniproxy.service", "sniproxy.socket", "sniproxy.toml", "sniproxy.logrotate", "sniproxy-alerts.yml",
            "sniproxy-alerts.test.yml", "sniproxy-dashboard.json"} <= names
    assert all(p.is_absolute() and p.is_file() for p in listed)
    assert main(["files", "sniproxy.socket"]) == 0
    assert capsys.readouterr().out == (REPO / "systemd" / "sniproxy.socket").read_text()
    assert main(["files", "sniproxy.sock"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("sniproxy: no file 'sniproxy.sock'; there are: ") and len(err.splitlines()) == 1


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    """`sniproxy check | head -1`: the pipe closes under the writer; no traceback follows."""
    import subprocess
    import sys

    from tests.helpers import REPO, clean_env

    path = tmp_path / "sniproxy.toml"
    path.write_text('[[listen]]\naddress = "127.0.0.1"\n[resolver]\nnameservers = ["127.0.0.53"]\n'
                    '[ecr]\nregion = "us-east-1"\naccounts = ["123456789012"]\n')
    proc = subprocess.Popen([sys.executable, "-m", "sniproxy", "check", "--config-only", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(), cwd=str(REPO))
    proc.stdout.close()  # gone before the first line: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(20) == 141
    assert err == ""  # no traceback, no "Exception ignored"
