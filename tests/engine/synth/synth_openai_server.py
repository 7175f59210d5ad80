"""A small OpenAI-compatible chat server on loopback that really generates with a tiny HF model.

Used by the http backend tests: `/v1/chat/completions` runs `HFGenerator` on the request's
messages (greedy at temperature 0, else sampling with the request's seed). It can answer
the first `fail_first` requests with 503 and delay replies, to exercise retries and timeouts,
and it records the peak number of requests in flight.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from engine.config import ModelConfig
from engine.synth.hf import HFGenerator


class ChatServer:
    def __init__(self, model_path: str, fail_first: int = 0, delay_s: float = 0.0):
        self.generator = HFGenerator(ModelConfig("tiny", model_path), max_tokens=16, temperature=0.0, top_p=1.0)
        self.model_path = model_path
        self.fail_first = fail_first
        self.delay_s = delay_s
        self.received = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        self._generate_lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def complete(self, payload: dict) -> str:
        with self._generate_lock:  # one forward pass at a time on the shared model
            g = self.generator
            g.max_tokens = int(payload.get("max_tokens", 16))
            g.temperature = float(payload.get("temperature", 0.0))
            g.top_p = float(payload.get("top_p", 1.0))
            return g.generate([payload["messages"]], [int(payload.get("seed", 0))])[0]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left, as the timeout test intends

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.received += 1
                    number = server.received
                    server.in_flight += 1
                    server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
                try:  # count the request as finished before its reply can reach the client
                    status, body = self._answer(payload, number)
                finally:
                    with server._lock:
                        server.in_flight -= 1
                self._reply(status, body)

            def _answer(self, payload: dict, number: int) -> tuple[int, dict]:
                if self.path != "/v1/chat/completions":
                    return 404, {"error": {"message": f"no route {self.path}"}}
                if number <= server.fail_first:
                    return 503, {"error": {"message": "warming up"}}
                time.sleep(server.delay_s)
                text = server.complete(payload)
                return 200, {
                    "id": f"chatcmpl-{number}",
                    "object": "chat.completion",
                    "model": payload.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "length"}],
                }

        return Handler
