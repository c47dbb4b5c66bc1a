"""sniproxy.tools.doctor against real loopback parts: a dnspython-built DNS server on 127.0.5.53,
TLS upstreams with trustme certificates on 127.0.5.x, and a real sniproxy for the listener
and metrics checks."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.server
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import closing

import pytest
import trustme

from sniproxy.tools import doctor
from tests.helpers import DnsServer, clean_env, free_port
from tests.tools.test_aws import (
    RTB_SUBNET,
    SUBNET,
    SUBNET_FILTER,
    VPC,
    VPC_FILTER,
    no_aws_env,
    route_table,
    subnet_item,
)
from tests.tools.test_discover import fake_credentials

assert no_aws_env and fake_credentials  # fixtures, used by name below

DNS_ADDRESS = "127.0.5.53"
GOOD, WRONG, REFUSED = "127.0.5.10", "127.0.5.11", "127.0.5.12"


class TlsServer:
    """Completes TLS handshakes with one certificate and ALPN h2, then waits for the close."""

    def __init__(self, address: str, cert: trustme.LeafCert):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.context)
        self.context.set_alpn_protocols(["h2"])
        self.sock = socket.socket()
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.handshakes = 0
        self.finished = threading.Event()
        """Set when a connection has ended: handshake done (or failed) and the peer closed."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    while data := tls.recv(4096):
                        self.received.append(data)
            except (ssl.SSLError, OSError):
                pass
            finally:
                conn.close()
                self.finished.set()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, str(path)


@pytest.fixture
def site(ca, tmp_path):
    """DNS with good/wrong/refused names; TLS upstreams for good (right cert) and wrong."""
    authority, _ = ca
    records = {"good.test": [GOOD], "wrong.test": [WRONG], "refused.test": [REFUSED],
               "vpce-0123abcd-uz5j3lr2.dkr.ecr.eu-west-2.vpce.amazonaws.com": [GOOD]}
    dns_server = DnsServer(DNS_ADDRESS)
    for name, addresses in records.items():
        for address in addresses:
            dns_server.add(name, address)
    with closing(dns_server), \
            TlsServer(GOOD, authority.issue_cert("good.test")) as good, \
            TlsServer(WRONG, authority.issue_cert("other.test")) as wrong:
        yield {"dns": dns_server, "good": good, "wrong": wrong, "tmp": tmp_path,
               "refused_port": free_port(REFUSED)}


def write_config(site, routes: list[tuple[str, str, int]], *, listen_port: int | None = None,
                 metrics_port: int | None = None, upstream: dict[str, str] | None = None) -> str:
    lines = ["[[listen]]", 'address = "127.0.5.20"',
             f"port = {listen_port or free_port('127.0.5.20')}",
             "[resolver]", f'nameservers = ["{DNS_ADDRESS}"]', f"port = {site['dns'].port}",
             "timeout = 1.0",
             "[server]", "connect_timeout = 2.0", "handshake_timeout = 2.0",
             "[metrics]", 'address = "127.0.5.21"',
             f"port = {metrics_port or free_port('127.0.5.21')}"]
    for name, sni, port in routes:
        lines += ["[[route]]", f'name = "{name}"', f'sni = "{sni}"', f"port = {port}"]
        if upstream and name in upstream:
            lines.append(f'upstream = "{upstream[name]}"')
    path = site["tmp"] / "sniproxy.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run(path: str, cafile: str | None, capsys, as_json: bool = False):
    code = doctor.main(argparse.Namespace(config=path, cafile=cafile, json=as_json, aws=False))
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def by_check(checks: list[doctor.Check], group: str) -> dict[str, list[doctor.Check]]:
    out: dict[str, list[doctor.Check]] = {}
    for c in checks:
        if c.group == group:
            out.setdefault(c.check, []).append(c)
    return out


def test_passing_route(site, ca, capsys):
    path = write_config(site, [("good", "good.test", site["good"].port)])
    code, out, err = run(path, ca[1], capsys)
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0] == "good.test"
    assert lines[1] == f"  PASS  dns     good.test  {GOOD} (TTL 60s)"
    assert lines[2].startswith(f"  PASS  tcp     {GOOD}:{site['good'].port}  connected in ")
    assert lines[3].startswith(f"  PASS  tls     {GOOD}:{site['good'].port}  TLSv1.3, ALPN h2, "
                               "chain and name verified, expires in ")
    assert "  PASS  listen  127.0.5.20:" in out and "bindable" in out
    assert "bindable (sniproxy is not running yet)" in out
    assert lines[-1] == "5 passed, 0 warnings, 0 failed, 0 skipped"
    assert site["good"].finished.wait(5)
    assert site["good"].handshakes == 1
    assert site["good"].received == []  # closed without sending data
    assert ("good.test", "A") in site["dns"].queries and ("good.test", "AAAA") in site["dns"].queries


def test_system_store_does_not_trust_the_test_ca(site, capsys):
    path = write_config(site, [("good", "good.test", site["good"].port)])
    code, out, _ = run(path, None, capsys)
    assert code == 1
    assert "FAIL  tls" in out and "certificate rejected: unable to get local issuer" in out


def test_wrong_certificate_name_fails(site, ca, capsys):
    path = write_config(site, [("good", "good.test", site["good"].port),
                               ("wrong", "wrong.test", site["wrong"].port)])
    code, out, _ = run(path, ca[1], capsys)
    assert code == 1
    checks = doctor.run_checks(doctor.config_mod.load(path), ca[1])
    tls = by_check(checks, "wrong.test")["tls"][0]
    assert tls.status == "fail"
    assert tls.detail.startswith("certificate rejected: Hostname mismatch")
    assert "wrong.test" in tls.detail
    assert by_check(checks, "good.test")["tls"][0].status == "pass"
    assert "hint: this address serves other names" in out


def test_refused_port_fails(site, ca, capsys):
    path = write_config(site, [("refused", "refused.test", site["refused_port"])])
    code, out, _ = run(path, ca[1], capsys)
    assert code == 1
    assert f"  FAIL  tcp     {REFUSED}:{site['refused_port']}  connection refused" in out
    assert "FAIL  tls" not in out


def test_nxdomain_fails(site, ca, capsys):
    path = write_config(site, [("missing", "missing.test", 443)])
    code, out, _ = run(path, ca[1], capsys)
    assert code == 1
    assert (f"  FAIL  dns     missing.test  NXDOMAIN from {DNS_ADDRESS}:{site['dns'].port}"
            in out)
    assert "hint: the VPC resolver does not know this name" in out


def test_silent_resolver_fails_within_its_timeout(site, ca, capsys, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((DNS_ADDRESS, 0))
        site = dict(site, dns=argparse.Namespace(port=silent.getsockname()[1]))
        path = write_config(site, [("good", "good.test", 443)])
        start = time.monotonic()
        code, out, _ = run(path, ca[1], capsys)
    assert time.monotonic() - start < 4
    assert code == 1
    assert "no answer from" in out and "within 1s" in out


def test_upstream_override_and_wildcard(site, ca, capsys):
    vpce = "vpce-0123abcd-uz5j3lr2.dkr.ecr.eu-west-2.vpce.amazonaws.com"
    path = write_config(site, [("good", "good.test", site["good"].port),
                               ("any", "*.wild.test", 443)], upstream={"good": vpce})
    code, out, _ = run(path, ca[1], capsys, as_json=True)
    report = json.loads(out)
    assert code == 0 and report["ok"] is True
    dns_check = [c for c in report["checks"] if c["group"] == "good.test"][0]
    assert dns_check["target"] == vpce
    assert dns_check["data"] == {"addresses": [GOOD], "ttl": 60}
    skipped = [c for c in report["checks"] if c["group"] == "*.wild.test"]
    assert [c["status"] for c in skipped] == ["skip"]
    tls = [c for c in report["checks"] if c["check"] == "tls"][0]
    assert tls["data"]["tls_version"] == "TLSv1.3" and tls["data"]["alpn"] == "h2"
    assert report["summary"] == {"pass": 5, "warn": 0, "fail": 0, "skip": 1}


def test_public_address_for_ecr_name_is_a_warning():
    assert doctor.expects_endpoint("api.ecr.eu-west-2.amazonaws.com", "api.ecr.eu-west-2.amazonaws.com")
    assert doctor.expects_endpoint("123456789012.dkr.ecr.eu-west-2.amazonaws.com",
                                   "123456789012.dkr.ecr.eu-west-2.amazonaws.com")
    assert doctor.expects_endpoint("ecr.cn-north-1.amazonaws.com.cn", "ecr.cn-north-1.amazonaws.com.cn")
    # S3 through the gateway endpoint resolves to public addresses, and that is right.
    bucket = "prod-eu-west-2-starport-layer-bucket.s3.eu-west-2.amazonaws.com"
    assert not doctor.expects_endpoint(bucket, bucket)
    assert doctor.expects_endpoint(bucket, "prod-eu-west-2-starport-layer-bucket.vpce-0e5e-3fq8c1vh"
                                           ".s3.eu-west-2.vpce.amazonaws.com")
    assert doctor.public_addresses(["10.20.1.5", "52.94.48.2", "127.0.5.10", "fd00::1",
                                    "2a05:d01c::1"]) == ["52.94.48.2", "2a05:d01c::1"]


def test_listener_in_use_by_another_process_fails(site, ca):
    with socket.socket() as taken:
        taken.bind(("127.0.5.20", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        check = doctor.check_listener("127.0.5.20", port)
    assert check.status == "fail"
    assert check.detail.startswith(f"in use by pid {os.getpid()}: ")


def test_listener_address_not_on_host_fails():
    check = doctor.check_listener("192.0.2.77", 443)  # TEST-NET-1: bind only, nothing is sent
    assert check.status == "fail" and check.detail in ("address not on this host",
                                                       "permission denied")


class OtherExporter(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b"# HELP node_load1 1m load average.\n# TYPE node_load1 gauge\nnode_load1 0.5\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_metrics_port_held_by_another_exporter_fails(site, ca):
    other = http.server.HTTPServer(("127.0.5.21", 0), OtherExporter)
    thread = threading.Thread(target=other.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        path = write_config(site, [("good", "good.test", site["good"].port)],
                            metrics_port=other.server_address[1])
        check = doctor.check_metrics(doctor.config_mod.load(path), running=False)
    finally:
        other.shutdown()
        other.server_close()
        thread.join(timeout=5)
    assert (check.status, check.check) == ("fail", "metrics")
    assert check.detail == "/metrics has no sniproxy_ metrics"


def test_metrics_port_held_by_a_silent_socket_fails(site, ca):
    with socket.socket() as other:
        other.bind(("127.0.5.21", 0))
        other.listen(1)
        path = write_config(site, [("good", "good.test", site["good"].port)],
                            metrics_port=other.getsockname()[1])
        config = doctor.config_mod.load(path)
        config = dataclasses.replace(config, server=dataclasses.replace(
            config.server, connect_timeout=0.2))
        check = doctor.check_metrics(config, running=False)
    assert (check.status, check.check) == ("fail", "metrics")
    assert check.detail.startswith(f"in use by pid {os.getpid()}")


def test_bad_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[[listen]]\naddress = "nope"\n')
    code, out, err = run(str(path), None, capsys)
    assert code == 2 and out == ""
    assert err == "doctor: error: config error: listen[0].address: expected an IPv4 or IPv6 address\n"
    code, out, err = run(str(tmp_path / "missing.toml"), None, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("doctor: error: config error")


def test_bad_cafile_is_one_line(site, tmp_path, capsys):
    path = write_config(site, [("good", "good.test", site["good"].port)])
    code, _, err = run(path, str(tmp_path / "nope.pem"), capsys)
    assert code == 2
    assert err == f"doctor: error: --cafile {tmp_path}/nope.pem: No such file or directory\n"


@contextlib.contextmanager
def running_sniproxy(path: str):
    """A real `python -m sniproxy run` with a clean environment, ready when its metrics are."""
    env = clean_env()
    proc = subprocess.Popen([sys.executable, "-m", "sniproxy", "run", "--config", path],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(20, proc.kill)  # a hung start ends in EOF, not a hung test
    watchdog.start()
    try:
        for line in proc.stderr:
            if "metrics on http://" in line:
                break
        else:
            raise AssertionError(f"sniproxy exited {proc.wait(5)} before serving metrics")
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        yield proc
    finally:
        watchdog.cancel()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_listener_served_by_running_sniproxy_and_metrics_answer(site, ca, capsys):
    path = write_config(site, [("good", "good.test", site["good"].port)])
    with running_sniproxy(path) as proc:
        code, out, _ = run(path, ca[1], capsys, as_json=True)
    report = json.loads(out)
    assert code == 0, out
    listen = [c for c in report["checks"] if c["check"] == "listen"][0]
    assert listen["status"] == "pass" and listen["detail"] == f"served by sniproxy (pid {proc.pid})"
    metrics = [c for c in report["checks"] if c["check"] == "metrics"][0]
    assert metrics["status"] == "pass" and metrics["data"]["families"] > 0


# --- --aws: the endpoint policies, through Stubbed EC2 ---------------------------------------

def aws_args(path: str, **kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    doctor.add_arguments(parser)
    return parser.parse_args(["--config", path, "--aws", *kw.pop("argv", [])])


def ecr_config(tmp_path, accounts='["123456789012"]') -> str:
    path = tmp_path / "sniproxy.toml"
    path.write_text('[[listen]]\naddress = "10.20.1.10"\n[resolver]\nnameservers = ["169.254.169.253"]\n'
                    f'[ecr]\nregion = "eu-west-2"\naccounts = {accounts}\n')
    return str(path)


def test_aws_reports_the_policy_findings_next_to_the_other_checks(fake_credentials, tmp_path, capsys, monkeypatch):
    from tests.tools.test_discover import RTB_B, RTB_C, default_policy_calls, stub_connect

    monkeypatch.setattr(doctor, "run_checks", lambda config, cafile: [
        doctor.Check(doctor.PASS, "dns", "api.ecr.eu-west-2.amazonaws.com", "api.ecr.eu-west-2.amazonaws.com",
                     "10.20.1.57 (TTL 60s)")])
    path = ecr_config(tmp_path)
    args = aws_args(path, argv=["--vpc-id", VPC, "--subnet-id", SUBNET])
    calls = [("describe_subnets", "add_response", {"Subnets": [subnet_item()]}, {"SubnetIds": [SUBNET]}),
             *default_policy_calls([RTB_B, RTB_C])]
    code = doctor.main(args, connect=stub_connect(calls))
    out = capsys.readouterr().out
    assert code == 0, out  # policy warnings do not fail the doctor
    lines = out.splitlines()
    group = lines.index("endpoint policies")
    assert lines[group + 1].startswith("  WARN  policy  ecr.api  policy of vpce-0aaa1111bbbb22223: statement 1")
    assert lines[group + 2] == ("                hint: aws ec2 modify-vpc-endpoint --region eu-west-2 --vpc-endpoint-id "
                                "vpce-0aaa1111bbbb22223 --policy-document file://sniproxy-policies/ecr-endpoints.json")
    assert lines[group + 3] == f"                      first write the policies: sniproxy policy --config {path} --out sniproxy-policies"
    assert "  WARN  policy  s3  policy of gateway vpce-0s3gw000000000000 allows more than s3:GetObject" in out
    assert "                      Either give the proxy's subnet a route table and S3 gateway endpoint" in out
    assert lines[-1] == "1 passed, 3 warnings, 0 failed, 0 skipped"


def test_aws_missing_endpoint_and_restricted_policies(fake_credentials, tmp_path, capsys, monkeypatch):
    from tests.tools.test_discover import stub_connect
    from tests.tools.test_endpoints import api, gateway

    monkeypatch.setattr(doctor, "run_checks", lambda config, cafile: [])
    calls = [("describe_subnets", "add_response", {"Subnets": [subnet_item()]}, {"SubnetIds": [SUBNET]}),
             ("describe_route_tables", "add_response", {"RouteTables": [route_table(RTB_SUBNET, subnet=SUBNET)]},
              {"Filters": SUBNET_FILTER}),
             ("describe_vpc_endpoints", "add_response", {"VpcEndpoints": [api(), gateway([RTB_SUBNET])]},
              {"Filters": VPC_FILTER})]
    code = doctor.main(aws_args(ecr_config(tmp_path), argv=["--subnet-id", SUBNET]), connect=stub_connect(calls))
    checks = {line.split()[2]: line.split()[0] for line in capsys.readouterr().out.splitlines()
              if line.startswith("  ") and "policy" in line.split()[1:2]}
    assert checks == {"ecr.api": "PASS", "ecr.dkr": "FAIL", "s3": "PASS"}
    assert code == 1


@pytest.mark.parametrize("argv, calls, detail", [
    ([], [], "no VPC: pass --vpc-id or --subnet-id (instance metadata is unavailable)"),
    (["--vpc-id", VPC], [("describe_route_tables", "add_client_error", "UnauthorizedOperation",
                          "You are not authorized to perform this operation.", 403)],
     "access denied: the IAM policy lacks ec2:DescribeRouteTables (see the IAM policy for discover in docs/aws.md)"),
    (["--region", "eu-west-1", "--vpc-id", VPC], [], "routes no registry in eu-west-1"),
], ids=["no-vpc", "access-denied", "wrong-region"])
def test_aws_problems_are_one_failed_check(fake_credentials, tmp_path, capsys, monkeypatch, argv, calls, detail):
    from tests.tools.test_discover import stub_connect

    monkeypatch.setattr(doctor, "run_checks", lambda config, cafile: [])
    code = doctor.main(aws_args(ecr_config(tmp_path), argv=argv), connect=stub_connect(calls))
    out = capsys.readouterr().out
    assert code == 1
    (line,) = [line for line in out.splitlines() if line.startswith("  FAIL")]
    assert line.endswith(detail)


def test_aws_without_credentials_is_one_failed_check(no_aws_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(doctor, "run_checks", lambda config, cafile: [])
    code = doctor.main(aws_args(ecr_config(tmp_path), argv=["--vpc-id", VPC]))
    out = capsys.readouterr().out
    assert code == 1
    (line,) = [line for line in out.splitlines() if line.startswith("  FAIL")]
    assert line.startswith("  FAIL  policy  eu-west-2  no AWS credentials found: attach an instance profile")
