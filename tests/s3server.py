"""A real S3 endpoint on 127.0.0.1 for the tests: moto's standalone server, behind a small proxy
that injects faults (the failures a real object store shows: 503 SlowDown, dropped connections,
a server that goes away).

The ranks reach the proxy through the standard AWS environment (`AWS_ENDPOINT_URL`); the test
process creates buckets and damages objects directly on the server (boto3).
"""

import http.client
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

from moto.server import ThreadedMotoServer

_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class Fault:
    """Requests matching `method` and containing `path_contains` fail: with HTTP `status`, or
    (status None) by dropping the connection; the first `times` matches (None: all)."""

    method: str
    path_contains: str = ""
    status: Optional[int] = 503
    times: Optional[int] = None
    after: int = 0  # matching requests let through first (a server that fails mid-save)
    hits: int = 0
    passed: int = 0

    def applies(self, method: str, path: str) -> bool:
        """Whether this request fails (counted as a hit)."""
        if method != self.method or self.path_contains not in path:
            return False
        if self.passed < self.after:
            self.passed += 1
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


@dataclass
class Traffic:
    faults: List[Fault] = field(default_factory=list)
    requests: List[tuple] = field(default_factory=list)  # (method, path, range header, bytes returned)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()
            self.requests.clear()


class S3Endpoint:
    def __init__(self):
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.upstream = (host, port)
        self.traffic = Traffic()
        self.proxy = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.upstream, self.traffic))
        self.proxy.daemon_threads = True
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.proxy.server_address[1]}"
        import boto3

        self.client = boto3.client(
            "s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="testing",
            aws_secret_access_key="testing", region_name="us-east-1",
        )

    def environment(self) -> dict:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "DIST_CKPT_S3_RETRIES": "2",
            "DIST_CKPT_S3_TIMEOUT": "20",
        }

    def create_bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> List[str]:
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [entry["Key"] for entry in page.get("Contents", [])]
        return sorted(found)

    def stop(self) -> None:
        self.proxy.shutdown()
        self.server.stop()


def _handler(upstream, traffic: Traffic):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are separate writes: no delayed-ACK stalls

        def log_message(self, *args):
            pass

        def _forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if self.path == CONTROL:
                return self._control(body)
            with traffic.lock:
                fault = next((f for f in traffic.faults if f.applies(self.command, self.path)), None)
            if fault is not None:
                if fault.status is None:  # a dropped connection
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(_SLOW_DOWN)
                return
            connection = http.client.HTTPConnection(*upstream, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            with traffic.lock:
                traffic.requests.append((self.command, self.path, self.headers.get("Range"), len(data)))
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
                    self.send_header(name, value)
            # a HEAD's Content-Length is the object's size
            self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            connection.close()

        def _control(self, body):
            """POST: replace the faults (a JSON list of Fault fields); GET: their hit counts."""
            with traffic.lock:
                if self.command == "POST":
                    traffic.faults[:] = [Fault(**fault) for fault in json.loads(body or b"[]")]
                reply = json.dumps([fault.hits for fault in traffic.faults]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


CONTROL = "/__faults__"


def set_faults(*faults: dict) -> None:
    """From any process: the proxy's faults become `faults` (Fault fields each)."""
    _control("POST", json.dumps(list(faults)).encode())


def fault_hits() -> List[int]:
    return _control("GET", None)


def _control(method: str, body):
    host, port = os.environ["AWS_ENDPOINT_URL"].rsplit("/", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request(method, CONTROL, body=body)
    reply = json.loads(connection.getresponse().read())
    connection.close()
    return reply
