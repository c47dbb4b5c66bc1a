"""The offline bundle installs and proxies where there is no network at all.

A network namespace of its own with nothing but lo: no route, no DNS but the test's. In it,
the bundle's install.sh makes a venv with Debian 12's python3.11 (Amazon Linux 2023's is the
same CPython) and installs from the wheels alone; that install's `sniproxy check` accepts a
config, and its `sniproxy run` carries a TLS connection to a trustme upstream that a dnspython
DNS server names, all on loopback inside the namespace. Nothing is imported from this checkout.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.helpers import DnsServer, Server, recv_exactly

from . import procs
from .netns import Namespace, ip
from .world import listening

pytestmark = pytest.mark.e2e

PYTHON = "/usr/bin/python3.11"  # Debian 12's
REGION, ACCOUNT = "us-east-1", "123456789012"
API = f"api.ecr.{REGION}.amazonaws.com"
PROXY, UPSTREAM = "127.0.0.1", "127.0.0.2"
MESSAGE = b"ping through an offline install\n"


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    if not os.access(PYTHON, os.X_OK):
        pytest.fail(f"{PYTHON} missing (apt-get install python3-venv)", pytrace=False)
    ns = Namespace("offline")
    ns.create()
    try:
        yield ns
    finally:
        leftover = ns.destroy()
        assert not leftover, f"processes left in {ns.name}: {leftover}"


def _echo(conn: socket.socket) -> None:
    conn.sendall(conn.recv(65536))


def test_the_bundle_installs_and_proxies_with_no_network(bundle, offline, tmp_path):
    # Nothing but lo: no address but loopback, no route anywhere else.
    links = ip("-n", offline.name, "-o", "link", "show").stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
    assert ip("-n", offline.name, "route", "show").stdout.strip() == ""

    with tarfile.open(bundle) as tar:
        tar.extractall(tmp_path, filter="data")
    venv = tmp_path / "venv"
    env = procs.clean_env(tmp_path / "home", PYTHON=PYTHON)
    installed = procs.run(offline, ["/bin/sh", str(tmp_path / "sniproxy-bundle" / "install.sh"), str(venv)], env,
                          timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    where = procs.run(offline, [str(venv / "bin" / "python"), "-I", "-c", "import sniproxy, uvloop; print(sniproxy.__file__)"],
                      env, timeout=60)
    assert where.stdout.startswith(str(venv) + "/"), where.stdout + where.stderr
    # An installed sniproxy has no checkout to build its own wheel from: it asks for one.
    again = procs.run(offline, [str(venv / "bin" / "sniproxy"), "bundle", "-o", str(tmp_path / "again.tar.gz")], env,
                      timeout=60)
    assert (again.returncode, again.stderr.splitlines()) == (2, [
        "bundle: error: this sniproxy is installed, not a checkout: give --wheel PATH (a sniproxy wheel)"])

    import trustme

    ca = trustme.CA()
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf = ca.issue_cert(API)
    leaf.configure_cert(server_tls)

    def servers() -> tuple[DnsServer, Server]:
        dns = DnsServer(PROXY)
        dns.add(API, UPSTREAM)
        return dns, Server(_echo, host=UPSTREAM, port=443, tls=server_tls)

    dns, upstream = offline.call(servers)
    port, metrics = 8443, 9464
    config = tmp_path / "sniproxy.toml"
    config.write_text(
        f'[[listen]]\naddress = "{PROXY}"\nport = {port}\n\n'
        f'[resolver]\nnameservers = ["{dns.host}"]\nport = {dns.port}\n\n'
        f'[metrics]\nport = {metrics}\n\n'
        f'[ecr]\nregion = "{REGION}"\naccounts = ["{ACCOUNT}"]\n')
    sniproxy = str(venv / "bin" / "sniproxy")
    checked = procs.run(offline, [sniproxy, "check", "--config", str(config)], env, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert f"config {config}: ok" in checked.stdout and f"  {PROXY}:{port}" in checked.stdout

    log = tmp_path / "sniproxy.log"
    service = procs.start(offline, "sniproxy-offline", [sniproxy, "run", "--config", str(config)], env, log)
    try:
        procs.wait_until(lambda: service.check_alive() or {(PROXY, port), ("127.0.0.1", metrics)}
                         <= offline.call(listening), 30, "the installed sniproxy to listen")

        def connect() -> tuple[bytes, bytes]:
            context = ssl.create_default_context(cafile=str(ca_pem))
            with socket.create_connection((PROXY, port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname=API) as tls:
                    tls.sendall(MESSAGE)
                    return recv_exactly(tls, len(MESSAGE)), tls.getpeercert(binary_form=True)

        reply, cert = offline.call(connect)
        assert reply == MESSAGE
        assert cert == ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())  # the upstream's own
        assert upstream.accepted == 1 and dns.count(API) >= 1
    finally:
        rc = service.stop(timeout=20)  # SIGTERM: drain, exit 0
        offline.call(dns.close)
        offline.call(upstream.close)
    assert rc == 0, procs.tail(log)
    access = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert [(a["sni"], a["route"], a["upstream"]) for a in access] == [(API, "ecr-api", f"{UPSTREAM}:443")]


def test_install_sh_needs_no_pip_config_of_the_host(bundle, tmp_path):
    """The host's pip config (an index, find-links, constraints) is not read: a config that
    would break the install changes nothing."""
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp_path, filter="data")
    bad = tmp_path / "pip.conf"
    bad.write_text("[global]\nindex-url = http://127.0.0.1:9/simple\nconstraint = /nonexistent/constraints.txt\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PIP_CONFIG_FILE": str(bad), "PIP_NO_INDEX": "0",
           "PIP_FIND_LINKS": "/nonexistent", "PYTHON": PYTHON}
    done = subprocess.run(["unshare", "-n", "/bin/sh", str(tmp_path / "sniproxy-bundle" / "install.sh"),
                           str(tmp_path / "venv")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert Path(tmp_path / "venv" / "bin" / "sniproxy").is_file()
