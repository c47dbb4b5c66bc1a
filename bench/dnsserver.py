"""Tiny authoritative UDP DNS server for the benchmark (dnspython).

Answers A queries for any name under bench.test with the upstream address; AAAA with an
empty NOERROR; anything else with NXDOMAIN. Prints "ready" once bound; stops on SIGTERM.

usage: python bench/dnsserver.py ADDRESS PORT UPSTREAM_IP
"""

import signal
import socket
import sys

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

ZONE = "bench.test."
TTL = 300


def answer(wire: bytes, upstream_ip: str) -> bytes | None:
    try:
        query = dns.message.from_wire(wire)
    except Exception:
        return None
    reply = dns.message.make_response(query)
    reply.flags |= dns.flags.AA
    if not query.question:
        reply.set_rcode(dns.rcode.FORMERR)
        return reply.to_wire()
    q = query.question[0]
    name = q.name.to_text().lower()
    if not (name == ZONE or name.endswith("." + ZONE)):
        reply.set_rcode(dns.rcode.NXDOMAIN)
    elif q.rdtype == dns.rdatatype.A:
        reply.answer.append(dns.rrset.from_text(q.name, TTL, dns.rdataclass.IN, dns.rdatatype.A, upstream_ip))
    return reply.to_wire()


def main() -> int:
    address, port, upstream_ip = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    sock.settimeout(0.5)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    print("ready", flush=True)
    while not stopping:
        try:
            wire, peer = sock.recvfrom(4096)
        except TimeoutError:
            continue
        except InterruptedError:
            continue
        out = answer(wire, upstream_ip)
        if out:
            sock.sendto(out, peer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
