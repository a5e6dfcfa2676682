#!/usr/bin/env python3
"""Hold N idle keep-alive connections to HOST:PORT for the memory scenario of tests/bench/run.

Each connection sends one GET / and reads the whole response, so the server has really
accepted and served it, then stays open and idle. When all are up, the number that got a
complete response is written to READY_FILE; the script then sleeps until it is killed
(at most 10 minutes). Needs `ulimit -n` above N.

With a fifth argument `tls`, each connection is a TLS connection (certificate not
verified; the handshake completes before the request is sent), for the TLS scenario.

usage: conn_holder.py HOST PORT N READY_FILE [tls]
"""

import socket
import ssl
import sys
import time

BATCH = 100
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: conn_holder\r\n\r\n"


def read_response(sock: socket.socket) -> bool:
    """Read one response with a Content-Length body; False if the server closed or failed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 2"):
        return False
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        body += chunk
    return True


def main() -> int:
    host, port, count, ready_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    context = None
    if len(sys.argv) > 5 and sys.argv[5] == "tls":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["http/1.1"])
    held = []
    for start in range(0, count, BATCH):
        batch = []
        for _ in range(min(BATCH, count - start)):
            sock = socket.create_connection((host, port), timeout=10)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname="localhost")
            sock.sendall(REQUEST)
            batch.append(sock)
        for sock in batch:
            try:
                if read_response(sock):
                    held.append(sock)
                else:
                    sock.close()
            except OSError:
                sock.close()
    with open(ready_file, "w", encoding="ascii") as ready:
        ready.write(f"{len(held)}\n")
    time.sleep(600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
