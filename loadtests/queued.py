"""What becomes of the connections queued at a worker whose socket closes (it died, or
stopped first): two SO_REUSEPORT listeners on one port, ``--connections`` connections made
and left unaccepted (the kernel spreads them over both), one listener closed; prints how
many the other can still accept. The rest were reset: at ``net.ipv4.tcp_migrate_req=0``
about half, at ``1`` none (deploy/README.md). Linux only; no engine needed.

    python loadtests/queued.py --connections 200
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

HOST = "127.0.0.1"


def _listener(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((HOST, port))
    sock.listen(1024)
    return sock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200)
    args = parser.parse_args()
    closing = _listener()
    port = closing.getsockname()[1]
    staying = _listener(port)
    clients = [socket.create_connection((HOST, port)) for _ in range(args.connections)]
    closing.close()
    staying.setblocking(False)
    taken = 0
    while True:
        try:
            conn, _ = staying.accept()
        except BlockingIOError:
            break
        conn.close()
        taken += 1
    for client in clients:
        client.close()
    staying.close()
    setting = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    value = setting.read_text().strip() if setting.exists() else "absent"
    print(f"tcp_migrate_req={value}: the socket left took {taken} of {args.connections}")


if __name__ == "__main__":
    main()
