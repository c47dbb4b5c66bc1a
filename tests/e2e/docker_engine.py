"""The Docker engine of the end-to-end suite: Debian's dockerd (with the containerd it starts
and manages, and runc) inside a client namespace, and the docker CLI that drives it.

Why not `ip netns exec`: it remounts /sys for the new network namespace, and dockerd then
exits with "Devices cgroup isn't mounted". So dockerd enters only the network namespace
(nsenter --net: /sys and its cgroups stay the host's), in a mount namespace of its own
(unshare --mount --propagation private) where three mounts give it the builder's view and
keep its writes off the host:

- /etc/hosts: the client namespace's own file (/etc/netns/<ns>/hosts), so the ECR names
  lead where that namespace's clients go;
- /etc/docker: a directory under the test's tmp. dockerd looks for registry CAs in
  /etc/docker/certs.d/<host>/ only, and writes its trust key (key.json) there on start;
- /run: an empty tmpfs. Whatever --exec-root says, dockerd makes /run/docker/plugins.

Mounts made in that namespace never reach the host's, and vanish with its last process.

How dockerd trusts the starport host it is redirected to: a registry endpoint gets one
tls.Config, the system roots plus certs.d/<registry host>/*.crt (moby's
registry.newTLSConfig), and the blob GET follows the registry's 307 with that endpoint's
transport. So the bucket's certificate is checked against the same pool, and the test CA in
certs.d/<dkr host>/ca.crt covers it: nothing is mounted over the system store and dockerd
gets no SSL_CERT_FILE. Every pull through the redirect proves it.

Everything dockerd keeps is under one directory: --data-root, --exec-root (its containerd's
config, state and socket are under it), --pidfile and the API socket. Stop: SIGTERM by PID
(dockerd stops its containerd first), SIGKILL after a deadline; then the teardown checks
that no process and no mount naming that directory is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers import unix_exchange

from . import procs
from .netns import ETC_NETNS, RUN_NETNS, Namespace

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # Debian's CLI, not whatever else is first on PATH
NSENTER = "/usr/bin/nsenter"
UNSHARE = "/usr/bin/unshare"
HELPER = "/usr/bin/docker-credential-ecr-login"
START_TIMEOUT = 60.0

# Runs as the mount namespace's first process, then becomes dockerd (exec), so the PID
# Popen knows is dockerd's own.
_ENTER = ('set -e; mount --bind "$1" /etc/hosts; mount --bind "$2" /etc/docker; '
          'mount -t tmpfs -o size=16m,mode=0755 e2e-dockerd-run /run; shift 2; exec "$@"')


def _ping(sock: Path) -> bool:
    """True once the daemon's API answers GET /_ping on its unix socket."""
    try:
        reply = unix_exchange(sock, b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.") and reply.endswith(b"OK")


def processes_naming(text: str) -> list[int]:
    """PIDs of processes whose command line contains `text` (our private directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry.name))
    return found


def mount_points() -> set[str]:
    """Mount points in this process's (the host's) mount namespace."""
    with open("/proc/self/mountinfo") as table:
        return {line.split()[4] for line in table}


class DockerEngine:
    """One dockerd in a client namespace; `docker()` runs the CLI against it."""

    def __init__(self, ns: Namespace, root: Path, log: Path, registries: list[str],
                 ca_pem: Path) -> None:
        self.ns = ns
        self.root = root
        self.log = log
        self.sock = root / "docker.sock"
        self.service: procs.Service | None = None
        self._registries = registries
        self._ca_pem = ca_pem
        self._runs = 0
        self._mounts_before: set[str] = set()

    # ---- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        etc_docker = self.root / "etc-docker"
        for host in self._registries:
            certs = etc_docker / "certs.d" / host
            certs.mkdir(parents=True)
            shutil.copy(self._ca_pem, certs / "ca.crt")
        daemon_json = etc_docker / "daemon.json"
        daemon_json.write_text(json.dumps({}))  # every setting is on the command line
        hosts = ETC_NETNS / self.ns.name / "hosts"
        assert hosts.is_file(), f"{self.ns.name} has no /etc/hosts of its own"
        argv = [
            NSENTER, f"--net={RUN_NETNS / self.ns.name}",
            UNSHARE, "--mount", "--propagation", "private",
            "/bin/sh", "-c", _ENTER, "enter", str(hosts), str(etc_docker),
            DOCKERD, "--config-file", str(daemon_json),
            "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
            "--pidfile", str(self.root / "dockerd.pid"), "-H", f"unix://{self.sock}",
            "--storage-driver", "vfs", "--iptables=false", "--ip6tables=false",
            "--ip-masq=false", "--bridge=none", "--userland-proxy=false",
        ]
        env = procs.clean_env(self.root / "home")
        self._mounts_before = mount_points()
        self.service = procs.spawn(f"dockerd-{self.ns.role}", argv, env, self.log)
        procs.wait_until(lambda: self.service.check_alive() or _ping(self.sock),
                         START_TIMEOUT, f"dockerd in {self.ns.name} to answer /_ping")
        pid = int((self.root / "dockerd.pid").read_text())
        assert pid == self.service.pid, f"dockerd pidfile says {pid}, started {self.service.pid}"

    def stop(self) -> list[str]:
        """Stop dockerd by PID; kill anything of ours still running. Returns problems seen."""
        problems = []
        if self.service is not None:
            rc = self.service.stop(timeout=20)
            if rc not in (0, -signal.SIGTERM):
                problems.append(f"dockerd in {self.ns.name} exited {rc}:\n{procs.tail(self.log)}")
        # The managed containerd names its config under our exec root: if dockerd did not
        # take it down, stop it here, by PID.
        deadline = time.monotonic() + 10
        while (left := processes_naming(str(self.root))) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:
            problems.append(f"process {pid} still running after dockerd stopped: killed")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ours = (str(self.root), "/etc/hosts", "/etc/docker")
        mounts = sorted(m for m in mount_points() - self._mounts_before
                        if m in ours or m.startswith(str(self.root) + "/"))
        if mounts:
            problems.append(f"mounts left on the host: {mounts}")
        return problems

    # ---- the CLI --------------------------------------------------------------------

    def docker(self, *args: str, config: Path, input: str | None = None,
               timeout: float = 120.0, **env: str) -> tuple[subprocess.CompletedProcess, float]:
        """Run the docker CLI in the client namespace (so a credential helper it starts
        resolves and connects as a builder's would); return (result, seconds).

        `config` is DOCKER_CONFIG, the CLI's private config.json; `env` is added to the
        CLI's (and so the credential helper's) environment.
        """
        self._runs += 1
        home = self.root / "home" / f"cli-{self._runs}"
        cli_env = procs.clean_env(home, DOCKER_HOST=f"unix://{self.sock}",
                                  DOCKER_CONFIG=str(config), **env)
        started = time.monotonic()
        result = procs.run(self.ns, [DOCKER, *args], cli_env, timeout=timeout, input=input)
        return result, time.monotonic() - started

    def image_id(self, ref: str, config: Path) -> str | None:
        result, _ = self.docker("image", "inspect", "--format", "{{.Id}}", ref, config=config)
        return result.stdout.strip() if result.returncode == 0 else None

    def versions(self, config: Path) -> dict[str, str]:
        """Engine, containerd and runc versions as the daemon reports them."""
        result, _ = self.docker("version", "--format", "{{json .}}", config=config)
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        out = {"docker CLI": seen["Client"]["Version"]}
        for component in seen["Server"]["Components"]:
            out[component["Name"]] = component["Version"]
        return out
