"""A small fault-injecting HTTP proxy on 127.0.0.1, placed between s3fs and the local S3 endpoint.

It forwards each request to the upstream endpoint unless the fault plan says otherwise: answer 503
SlowDown or 500 InternalError, reset the connection without answering, or answer slowly. The plan is a
callable (request number, method, path) -> fault name or None, so tests can inject transient faults (the
first tries of each object fail) or permanent ones (every request fails).
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{msg}</Message>'
    "<RequestId>fault</RequestId></Error>"
)
HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}


class FaultProxy:
    def __init__(self, upstream: str, plan):
        u = urlparse(upstream)
        self.up_host, self.up_port = u.hostname, u.port
        self.plan = plan
        self.lock = threading.Lock()
        self.count = 0
        self.injected: dict[str, int] = {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    proxy.count += 1
                    n = proxy.count
                fault = proxy.plan(n, self.command, self.path)
                if fault:
                    with proxy.lock:
                        proxy.injected[fault] = proxy.injected.get(fault, 0) + 1
                if fault == "reset":
                    # RST instead of FIN: the client sees "connection reset by peer".
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault in ("503", "500"):
                    code, msg = ("SlowDown", "Please reduce your request rate.") if fault == "503" else (
                        "InternalError", "We encountered an internal error. Please try again.")
                    data = ERROR_XML.format(code=code, msg=msg).encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if fault == "slow":
                    time.sleep(0.3)
                conn = http.client.HTTPConnection(proxy.up_host, proxy.up_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                conn.request(self.command, self.path, body=body if body or length else None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
