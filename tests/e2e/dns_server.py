"""A tiny authoritative DNS server for the end-to-end suite (dnspython, UDP and TCP).

Stands in for the VPC resolver: it maps the ECR names to the upstream servers' addresses.
`--record NAME=IPV4` may repeat; NAME may start with "*." to match any deeper name.
A names it knows get an A record; AAAA for them is an empty NOERROR; anything else NXDOMAIN.
Each query is logged as one line on stdout, so the suite can check who asked for what.

    python dns_server.py --listen 127.0.0.1 --port 53 --record api.example=10.0.0.1
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import struct
import sys
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

TTL = 30


class Zone:
    def __init__(self, records: list[str]) -> None:
        self.exact: dict[dns.name.Name, str] = {}
        self.wild: dict[dns.name.Name, str] = {}
        for record in records:
            name, _, address = record.partition("=")
            socket.inet_aton(address)  # a typo fails here, not at query time
            if name.startswith("*."):
                self.wild[dns.name.from_text(name[2:])] = address
            else:
                self.exact[dns.name.from_text(name)] = address

    def lookup(self, qname: dns.name.Name) -> str | None:
        if qname in self.exact:
            return self.exact[qname]
        for suffix, address in self.wild.items():
            if qname.is_subdomain(suffix) and qname != suffix:
                return address
        return None

    def answer(self, wire: bytes, peer: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception as exc:  # a malformed query is dropped, as a resolver would
            log(f"bad query from {peer}: {exc}")
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            address = self.lookup(question.name)
            qtype = dns.rdatatype.to_text(question.rdtype)
            if address is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                result = "NXDOMAIN"
            elif question.rdtype == dns.rdatatype.A:
                response.answer.append(dns.rrset.from_text(
                    question.name, TTL, dns.rdataclass.IN, dns.rdatatype.A, address))
                result = address
            else:
                result = "NODATA"
            log(f"query peer={peer} name={question.name.to_text(omit_final_dot=True)} "
                f"type={qtype} answer={result}")
        return response.to_wire()


def log(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--record", action="append", default=[])
    args = parser.parse_args(argv)
    zone = Zone(args.record)

    class UDPHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            reply = zone.answer(data, f"{self.client_address[0]}:{self.client_address[1]}")
            if reply is not None:
                sock.sendto(reply, self.client_address)

    class TCPHandler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.connection.settimeout(5)
            peer = f"{self.client_address[0]}:{self.client_address[1]}"
            while True:
                head = self.rfile.read(2)
                if len(head) < 2:
                    return
                wire = self.rfile.read(struct.unpack("!H", head)[0])
                reply = zone.answer(wire, peer)
                if reply is None:
                    return
                self.wfile.write(struct.pack("!H", len(reply)) + reply)

    socketserver.ThreadingUDPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    udp = socketserver.ThreadingUDPServer((args.listen, args.port), UDPHandler)
    tcp = socketserver.ThreadingTCPServer((args.listen, args.port), TCPHandler)
    udp.daemon_threads = tcp.daemon_threads = True
    threading.Thread(target=udp.serve_forever, daemon=True).start()
    log(f"ready on {args.listen}:{args.port} with {len(args.record)} records")
    try:
        tcp.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())
