"""`sniproxy check|hosts`: the main cases as real `python -m sniproxy` subprocesses with a clean
environment, all started at once so their ~0.3 s start-ups overlap; the many bad-input variants
through ``cli.main(argv)`` in-process, which runs the same code minus the interpreter start.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from sniproxy.config import system_nameservers

REPO = Path(__file__).resolve().parent.parent

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
    "check_good": ["check", "--config", "{d}/good.toml"],
    "hosts_good": ["hosts", "--config", "{d}/good.toml", "--address", "10.9.9.9"],
    "hosts_default_address": ["hosts", "-c", "{d}/good.toml"],
    "hosts_wild_listeners": ["hosts", "--config", "{d}/wild.toml"],
    "hosts_bad_address": ["hosts", "--config", "{d}/good.toml", "--address", "proxy.example.com"],
    "check_region": ["check", "--region", "us-east-1", "--account", "123456789012", "--account", "210987654321"],
    "region_without_account": ["check", "--region", "us-east-1"],
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
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            results[name] = Run(proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


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
@pytest.mark.parametrize("mode, name", modes("check_region"))
def test_check_region_and_accounts(cli, mode, name):
    r = cli(mode, name)
    assert (r.returncode, r.stderr) == (0, "")
    lines = r.stdout.splitlines()
    assert lines[0] == "config --region/--account: ok"
    assert lines[1:4] == ["listeners:", "  0.0.0.0:443", "  [::]:443"]
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
