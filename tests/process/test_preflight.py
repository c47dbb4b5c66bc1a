"""preflight's decisions, with the host faked: who holds an address, and what systemd passed.
The real thing (real sockets, a real socket-activated proxy) is in test_cli.py and
tests/integration/test_operations.py."""

from __future__ import annotations

import os

import pytest

from sniproxy.config import from_dict
from sniproxy.process import preflight
from sniproxy.process.preflight import _Activated, _Probe


def config(*listens: str, **metrics):
    return from_dict({
        "listen": [{"address": a.rsplit(":", 1)[0], "port": int(a.rsplit(":", 1)[1])} for a in listens],
        "resolver": {"nameservers": ["127.0.0.53"]},
        "metrics": metrics or {"port": 9464},
        "route": [{"name": "r", "sni": "a.example.com"}],
    })


@pytest.fixture
def host(monkeypatch):
    """Set who holds which address, which sniproxy processes run, and what systemd passed."""
    state = {"probes": {}, "pids": [], "activated": {}}
    monkeypatch.setattr(preflight, "_probe", lambda a, p: state["probes"].get((a, p), _Probe("free")))
    monkeypatch.setattr(preflight, "_sniproxy_pids", lambda: state["pids"])
    monkeypatch.setattr(preflight, "_inherited_addresses", lambda pid: state["activated"].get(pid))
    monkeypatch.setattr(preflight, "_parent", lambda pid: 1)
    monkeypatch.delenv("MAINPID", raising=False)
    return state


def test_root_by_hand_sees_systemd_first_and_still_finds_the_activated_service(host):
    """Outside the unit, as root, pid 1 is the first holder of a socket unit's sockets."""
    host["probes"] = {("10.0.1.10", 443): _Probe("systemd", 1)}
    host["pids"] = [812, 813]
    host["activated"] = {812: _Activated(812, "sniproxy.socket", [("10.0.1.10", 443)])}
    assert preflight.bind_problems(config("10.0.1.10:443")) == []
    (problem,) = preflight.bind_problems(config("10.0.1.10:443", "10.0.1.11:443"))
    assert problem.startswith("sniproxy: listen[1] 10.0.1.11:443 is not passed by sniproxy.socket to the running "
                              "sniproxy (pid 812), and a reload cannot add a socket: add ListenStream=10.0.1.11:443")


def test_mainpid_names_the_service(host, monkeypatch):
    monkeypatch.setenv("MAINPID", "900")
    host["probes"] = {("10.0.1.10", 443): _Probe("sniproxy", 901), ("10.0.1.11", 443): _Probe("sniproxy", 901)}
    host["activated"] = {900: _Activated(900, "sniproxy.socket", [("10.0.1.10", 443), ("10.0.1.11", 443)])}
    (problem,) = preflight.bind_problems(config("10.0.1.11:443"))
    assert problem.startswith("sniproxy: sniproxy.socket passes 10.0.1.10:443 to the running sniproxy (pid 900), "
                              "and no [[listen]] names it any more: remove ListenStream=10.0.1.10:443")


def test_without_socket_activation_a_new_listener_only_has_to_be_free(host):
    host["probes"] = {("10.0.1.10", 443): _Probe("sniproxy", 700)}
    assert preflight.bind_problems(config("10.0.1.10:443", "10.0.1.11:443")) == []


def test_each_failure_is_a_line_naming_the_entry(host):
    host["probes"] = {("10.0.1.10", 443): _Probe("failed", problem="Permission denied (hint)"),
                      ("127.0.0.1", 9464): _Probe("failed", problem="in use by pid 5 (nginx)")}
    assert preflight.bind_problems(config("10.0.1.10:443")) == [
        "sniproxy: cannot listen on 10.0.1.10:443 (listen[0]): Permission denied (hint)",
        "sniproxy: cannot serve metrics on 127.0.0.1:9464: in use by pid 5 (nginx); set [metrics] address/port, "
        "or enabled = false"]


def test_disabled_metrics_are_not_probed(host):
    host["probes"] = {("127.0.0.1", 9464): _Probe("failed", problem="in use")}
    assert preflight.bind_problems(config("10.0.1.10:443", enabled=False)) == []


def test_unwritable(tmp_path):
    (tmp_path / "ok.log").write_text("")
    assert preflight._unwritable(str(tmp_path / "ok.log")) is None
    assert preflight._unwritable(str(tmp_path / "new.log")) is None
    assert (tmp_path / "new.log").exists() is False  # nothing created
    assert preflight._unwritable(str(tmp_path)) == "is a directory"
    assert preflight._unwritable(str(tmp_path / "no" / "x.log")) == f"cannot create it: {tmp_path / 'no'} does not exist"
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o500)
        assert preflight._unwritable(str(tmp_path / "ro" / "x.log")).startswith("cannot create it: ")


# -- descriptors, as nginx warns that worker_connections exceed the open file limit --------------------

def test_max_connections_over_the_descriptor_limit_is_a_warning_naming_both():
    conf = config("127.0.0.1:8443")
    assert preflight.descriptor_warnings(conf, limit=65536) == []
    assert preflight.descriptor_warnings(conf, limit=20000) == []  # 10,000 connections: 20,000 sockets
    (warning,) = preflight.descriptor_warnings(conf, limit=256)
    assert warning.startswith("server.max_connections 10000 needs 20000 descriptors per process (2 sockets a "
                              "connection; splicing directions take 4 more while they can), but RLIMIT_NOFILE is 256")


def test_the_descriptor_limit_is_raised_to_the_hard_one_at_run(monkeypatch):
    import resource

    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 65536))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    preflight.raise_descriptor_limit()
    assert calls == [(65536, 65536)]
