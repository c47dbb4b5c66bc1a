"""The stack's real user data boots an "instance" in a network namespace with no way out.

The instance namespace has only lo and two veths. One leads to a "VPC" namespace holding what
a VPC without internet provides, stood in for by real servers (tests/deploy/vpc_standins.py):
the instance metadata service (IMDSv2) on 169.254.169.254, the VPC resolver (a dnspython
server) on 10.0.0.2 and 169.254.169.253, the interface endpoints' addresses in the VPC range,
and the S3 gateway endpoint behind a route for S3's addresses (as the endpoint's prefix-list
route). The other veth carries the default route to an "internet" namespace where every address
is local and nothing listens, so a connection out fails at once, and a recorder there sees it.

The user data runs unchanged, as root, in a mount namespace whose /etc, /opt, /var, /root and
/usr/local are overlays of this machine's, so what it writes goes to the test's directory:
- dnf and systemctl are stubs that record their calls; systemctl starts the installed
  sniproxy as the unit's ExecStart says;
- python3.11, curl and the AWS CLI v2 are the real Debian ones (the AMI has its own);
- the one environment difference: AWS_CA_BUNDLE and SSL_CERT_FILE name the stand-ins' CA,
  which stands in for the public CAs the AMI trusts.

What stays unproven without AWS: the real endpoints' policies, security groups and private
DNS; dnf against Amazon Linux's repositories; systemd running the units (the unit tests and
the e2e suite cover sniproxy under systemd-socket-activate); the AMI's own CLI and curl.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sniproxy import config as config_mod
from sniproxy.config import MetricsConfig
from sniproxy.ecr import starport_bucket
from sniproxy.observe.http import READY_PATH
from tests.e2e import netns
from tests.e2e.procs import wait_until

from . import vpc_standins
from .cfn import Stack, load
from .test_sniproxy_fleet import REQUIRED, TEMPLATE, user_data

REGION = "eu-west-2"
ACCOUNT = "460811381319"
INSTANCE = vpc_standins.Instance(instance_id="i-0a1b2c3d4e5f60718", region=REGION, vpc_id=REQUIRED["VpcId"],
                                 subnet_id=REQUIRED["SubnetA"], vpc_cidr="10.0.0.0/16", private_ip="10.0.1.57")
RESOLVER = "10.0.0.2"                 # the VPC CIDR's base + 2 (and 169.254.169.253)
ECR_ENI = "10.0.1.100"                # the ecr.api / ecr.dkr interface endpoints in SubnetA
CLOUDFORMATION_ENI = "10.0.1.101"     # the cloudformation interface endpoint
S3_ADDRESS = "52.218.0.10"            # an S3 address, routed to the gateway endpoint
S3_PREFIX = "52.218.0.0/17"           # the gateway endpoint's prefix-list route, stood in for
VPC_ADDRESSES = (RESOLVER, "169.254.169.253", "169.254.169.254", ECR_ENI, CLOUDFORMATION_ENI, S3_ADDRESS)
BUILDER = "10.8.0.5"                  # in BuilderCidr1: a builder connecting through the NLB
BUNDLE_URI = "s3://artifacts-460811/sniproxy/sniproxy-bundle-0.1.0.tar.gz"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
METRICS_PORT = config_mod.default(MetricsConfig, "port")
BOOT_TIMEOUT = 300

NAMES = {  # the VPC resolver's answers: the endpoints' private DNS, and S3's public names
    f"api.ecr.{REGION}.amazonaws.com": ECR_ENI, f"ecr.{REGION}.amazonaws.com": ECR_ENI,
    f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com": ECR_ENI,
    f"cloudformation.{REGION}.amazonaws.com": CLOUDFORMATION_ENI,
    f"*.s3.{REGION}.amazonaws.com": S3_ADDRESS, f"s3.{REGION}.amazonaws.com": S3_ADDRESS,
    "*.s3.amazonaws.com": S3_ADDRESS, "s3.amazonaws.com": S3_ADDRESS,
}

# The stubs for what the AMI has and this machine must not run for real.
RECORD = '#!/bin/sh\nprintf "%s %s\\n" "$(basename "$0")" "$*" >> {calls}\n'
SYSTEMCTL = RECORD + """\
case "$1" in enable)
    # systemd would start the socket and the service; run the unit's ExecStart, as root.
    start=$(sed -n 's/^ExecStart=//p' /etc/systemd/system/sniproxy.service)
    setsid $start > {root}/sniproxy.log 2>&1 < /dev/null &
    echo $! > {root}/sniproxy.pid ;;
esac
"""
# Runs inside `ip netns exec INSTANCE unshare --mount`: the instance's view of the disk.
RUNNER = """\
set -eu
root=$1
for dir in etc opt var root usr/local; do
    mkdir -p "$root/upper/$dir" "$root/work/$dir"
    mount -t overlay overlay -o "lowerdir=/$dir,upperdir=$root/upper/$dir,workdir=$root/work/$dir" "/$dir"
done
rm -f /etc/resolv.conf
printf 'nameserver {resolver}\\n' > /etc/resolv.conf
install -m 0755 "$root/stubs/dnf" "$root/stubs/systemctl" /usr/local/bin/
touch "$root/console"
mount --bind "$root/console" /dev/console
exec bash "$root/user-data" > "$root/cloud-init-output.log" 2>&1
"""


def _unavailable() -> str | None:
    for tool, package in (("/usr/bin/aws", "awscli"), ("/usr/bin/python3.11", "python3.11-venv"),
                          ("/usr/bin/curl", "curl"), ("/usr/bin/unshare", "util-linux"),
                          ("/usr/bin/nsenter", "util-linux")):
        if not os.access(tool, os.X_OK):
            return f"{tool} missing (apt-get install {package})"
    try:
        netns.probe()
    except netns.NetnsUnavailable as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def prerequisites():
    missing = _unavailable()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the boot rehearsal must run on CI but cannot: {missing}", pytrace=False)
        pytest.skip(f"boot rehearsal skipped: {missing}")
    netns.clean_stale()


@pytest.fixture(scope="module")
def ca(prerequisites):
    import trustme

    authority = trustme.CA()
    names = [name for name in NAMES] + [starport_bucket(REGION) + f".s3.{REGION}.amazonaws.com"]
    return authority, authority.issue_cert(*names)


class Vpc:
    """The three namespaces and the stand-ins; `boot` runs the user data once."""

    def __init__(self, root: Path, bundle: Path, ca) -> None:
        self.root = root
        self.instance = netns.Namespace("boot-inst")
        self.vpc = netns.Namespace("boot-vpc")
        self.internet = netns.Namespace("boot-net")
        self.bundle, (self.authority, self.leaf) = bundle, ca
        self.dns: list[subprocess.Popen] = []
        self.servers: list = []
        self.recorder: vpc_standins.Recorder | None = None

    def build(self) -> None:
        for ns in (self.instance, self.vpc, self.internet):
            ns.create()
            # IPv4 only, as the VPC: no router solicitations for the recorder to mistake.
            for key in ("all", "default"):
                subprocess.run(ns.exec_argv(["sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"]),
                               check=True, timeout=20, env={"PATH": PATH})
        netns.link(self.instance, INSTANCE.private_ip, self.vpc, "10.0.1.1", prefix=24)
        for address in VPC_ADDRESSES:
            self.vpc.run_ip("addr", "add", f"{address}/32", "dev", "to-boot-inst")
        # The VPC's local route, the link-local services, and S3's prefix-list route; no NAT.
        for destination in ("10.0.0.0/16", "169.254.169.253/32", "169.254.169.254/32", S3_PREFIX):
            self.instance.run_ip("route", "add", destination, "dev", "to-boot-vpc")
        # Everything else goes to the "internet", where every address is local and no port
        # is open: a connection is refused at once, and the recorder sees it.
        netns.link(self.instance, "100.64.0.2", self.internet, "100.64.0.1")
        self.instance.run_ip("route", "add", "default", "via", "100.64.0.1")
        self.internet.run_ip("route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "local")
        self.recorder = self.internet.call(vpc_standins.Recorder, "to-boot-inst")
        # The watch can see: an attempt out (TEST-NET-1) is refused at once, and recorded.
        probe = subprocess.run(self.instance.exec_argv(["/usr/bin/curl", "-sS", "--max-time", "5", "http://192.0.2.1/"]),
                               capture_output=True, text=True, timeout=20, env={"PATH": PATH})
        assert probe.returncode == 7, probe.stderr  # "Failed to connect ... after 0 ms"
        wait_until(lambda: ("192.0.2.1", 6, 80) in self.recorder.packets, 10, "the recorder to see the probe")
        self.recorder.packets.clear()
        # A builder's address on the instance's side, to connect through the proxy from.
        self.instance.run_ip("addr", "add", f"{BUILDER}/32", "dev", "lo")

        # The resolver on both of its addresses; one server each, so that a UDP answer comes
        # from the address that was asked.
        records = [arg for name, address in NAMES.items() for arg in ("--record", f"{name}={address}")]
        for address in (RESOLVER, "169.254.169.253"):
            log = self.root / f"dns-{address}.log"
            with open(log, "wb") as out:
                self.dns.append(subprocess.Popen(
                    self.vpc.exec_argv([sys.executable, "-m", "tests.e2e.dns_server",
                                        "--listen", address, "--port", "53", *records]),
                    stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
                    env={"PATH": PATH, "LANG": "C.UTF-8"}, start_new_session=True))
            wait_until(lambda log=log: b"ready on" in log.read_bytes(), 30, f"the VPC resolver on {address}")

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.leaf.configure_cert(context)
        self.imds = self.vpc.call(vpc_standins.imds, INSTANCE.metadata())
        self.aws = self.vpc.call(vpc_standins.aws, context, self.bundle, BUNDLE_URI)
        for server in (self.imds, self.aws):
            vpc_standins.serve(server)
            self.servers.append(server)

    def boot(self, script: str) -> tuple[int, float]:
        """Run the user data in the instance; its exit status and duration in seconds."""
        (self.root / "stubs").mkdir()
        calls = self.root / "calls.log"
        (self.root / "stubs" / "dnf").write_text(RECORD.format(calls=calls))
        (self.root / "stubs" / "systemctl").write_text(SYSTEMCTL.format(calls=calls, root=self.root))
        (self.root / "user-data").write_text(script)
        (self.root / "runner").write_text(RUNNER.format(resolver=RESOLVER))
        self.authority.cert_pem.write_to_path(str(self.root / "ca.pem"))
        env = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root",
               "AWS_CA_BUNDLE": str(self.root / "ca.pem"), "SSL_CERT_FILE": str(self.root / "ca.pem")}
        started = time.monotonic()
        result = subprocess.run(
            self.instance.exec_argv(["/usr/bin/unshare", "--mount", "--propagation", "private", "--",
                                     "/bin/bash", str(self.root / "runner"), str(self.root)]),
            env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT)
        return result.returncode, time.monotonic() - started

    def sniproxy_pid(self) -> int | None:
        path = self.root / "sniproxy.pid"
        return int(path.read_text()) if path.exists() else None

    def on_the_instance(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A command in the booted instance's namespaces (network and disk), as the proxy sees them."""
        pid = self.sniproxy_pid()
        assert pid is not None, "sniproxy was never started"
        return subprocess.run(["/usr/bin/nsenter", "-t", str(pid), "-m", "-n", "--", *argv],
                              env={"PATH": PATH, "LANG": "C.UTF-8"}, capture_output=True, text=True, timeout=timeout)

    def log(self) -> str:
        return (self.root / "cloud-init-output.log").read_text(errors="replace")

    def calls(self) -> list[str]:
        path = self.root / "calls.log"
        return path.read_text().splitlines() if path.exists() else []

    def dns_queries(self) -> set[str]:
        return {name for log in self.root.glob("dns-*.log") for name in re.findall(r"name=(\S+)", log.read_text())}

    def destroy(self) -> None:
        pid = self.sniproxy_pid()
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)  # setsid made it a group leader: itself and its workers
            except ProcessLookupError:
                pass
        for server in self.servers:
            server.shutdown()
            server.server_close()
        if self.recorder is not None:
            self.recorder.close()
        for server in self.dns:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=10)
        for ns in (self.instance, self.vpc, self.internet):
            for leftover in ns.destroy():
                os.kill(leftover, signal.SIGKILL)


@pytest.fixture
def vpc(prerequisites, bundle, ca, tmp_path):
    world = Vpc(tmp_path, bundle, ca)
    try:
        world.build()
        yield world
    finally:
        world.destroy()


def stack_user_data(**parameters: str) -> str:
    stack = Stack(load(TEMPLATE), {**REQUIRED, "BundleS3Uri": BUNDLE_URI, **parameters}, region=REGION,
                  account=ACCOUNT)
    return user_data(stack)


def test_the_user_data_boots_with_no_route_out_and_serves(vpc):
    status, seconds = vpc.boot(stack_user_data())
    print(f"boot rehearsal: user data ran in {seconds:.1f} s")
    log = vpc.log()
    assert status == 0, log[-4000:]
    assert log.rstrip().endswith("sniproxy bootstrap: done"), log[-2000:]
    assert (vpc.root / "console").read_text() == "sniproxy bootstrap: done\n"

    # Nothing tried to leave: no packet reached the internet, no name outside the VPC's asked.
    assert vpc.recorder.packets == []
    expected = {name.removeprefix("*.") for name in NAMES} | {
        f"{starport_bucket(REGION)}.s3.{REGION}.amazonaws.com", f"{starport_bucket(REGION)}.s3.amazonaws.com",
        f"artifacts-460811.s3.{REGION}.amazonaws.com"}
    assert vpc.dns_queries() <= expected, vpc.dns_queries() - expected

    # Packages from Amazon Linux's repositories (dnf stubbed), the units to systemd (stubbed).
    assert vpc.calls() == ["dnf install -y python3.11 python3.11-pip", "systemctl daemon-reload",
                           "systemctl enable --now sniproxy.socket sniproxy.service"]

    # IMDSv2 only, and the instance role's credentials signed both AWS calls.
    assert vpc.imds.calls[0] == ("PUT", "/latest/api/token", True)
    assert all(authorised for _, _, authorised in vpc.imds.calls), vpc.imds.calls
    key, token = vpc_standins.CREDENTIALS["AccessKeyId"], vpc_standins.CREDENTIALS["Token"]
    s3 = [c for c in vpc.aws.calls if c.service == "s3"]
    assert [(c.method, c.path) for c in s3] == [("GET", "/sniproxy/sniproxy-bundle-0.1.0.tar.gz")], s3
    assert s3[0].host == f"artifacts-460811.s3.{REGION}.amazonaws.com"
    assert (s3[0].access_key, s3[0].signing, s3[0].session_token) == (key, (REGION, "s3"), token)
    signals = [c for c in vpc.aws.calls if c.service == "cloudformation"]
    assert [c.params for c in signals] == [{
        "Action": "SignalResource", "Version": "2010-05-15", "StackName": "sniproxy",
        "LogicalResourceId": "AutoScalingGroup", "UniqueId": INSTANCE.instance_id, "Status": "SUCCESS"}]
    assert (signals[0].access_key, signals[0].signing) == (key, (REGION, "cloudformation"))
    assert not [c for c in vpc.aws.calls if c.service == "other"]

    # sniproxy from the bundle, in the venv, on the config the boot wrote; `check` passes there.
    installed = vpc.on_the_instance("/opt/sniproxy/bin/python", "-m", "pip", "list", "--format=freeze")
    assert "sniproxy==0.1.0" in installed.stdout.split(), installed.stdout
    check = vpc.on_the_instance("/opt/sniproxy/bin/sniproxy", "check", "--config", "/etc/sniproxy/sniproxy.toml")
    assert check.returncode == 0, check.stdout + check.stderr
    config = config_mod.load(str(vpc.root / "upper" / "etc" / "sniproxy" / "sniproxy.toml"))
    assert [entry.key for entry in config.listen] == [(INSTANCE.private_ip, 443)]
    assert config.resolver.nameservers == ("169.254.169.253", RESOLVER)
    assert config.server.allow == (REQUIRED["BuilderCidr1"],)

    # It serves: /readyz for the balancer, and a builder's TLS connection through to the
    # ECR endpoint, whose certificate the client verifies end to end.
    ready = vpc.on_the_instance("/usr/bin/curl", "-fsS", f"http://{INSTANCE.private_ip}:{METRICS_PORT}{READY_PATH}")
    assert ready.returncode == 0, ready.stderr
    through = vpc.on_the_instance(
        "/usr/bin/curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
        "--interface", BUILDER, "--cacert", str(vpc.root / "ca.pem"),
        "--resolve", f"api.ecr.{REGION}.amazonaws.com:443:{INSTANCE.private_ip}",
        f"https://api.ecr.{REGION}.amazonaws.com/")
    assert through.stdout == "403", through.stdout + through.stderr  # the stand-in's answer to a bare GET
    assert vpc.recorder.packets == []


def test_a_failed_step_is_on_the_console_and_in_the_failure_signal(vpc):
    """The bundle cannot be read (the endpoint policy, or the role, denies it): the boot stops
    at that step, says so on the console, signals FAILURE with the step, and starts nothing."""
    vpc.aws.s3_refuses = True
    status, _ = vpc.boot(stack_user_data())
    assert status != 0, vpc.log()[-2000:]
    console = (vpc.root / "console").read_text()
    assert re.fullmatch(r"sniproxy bootstrap: FAILED at step install \(exit \d+, line \d+\); "
                        r"the lines above say why\n", console), console
    assert "AccessDenied" in vpc.log()
    signals = [c.params for c in vpc.aws.calls if c.service == "cloudformation"]
    assert [(s["UniqueId"], s["Status"]) for s in signals] == [(f"{INSTANCE.instance_id}-install", "FAILURE")]
    assert vpc.calls() == ["dnf install -y python3.11 python3.11-pip"]
    assert vpc.sniproxy_pid() is None
    assert vpc.recorder.packets == []
