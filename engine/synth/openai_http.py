"""Any OpenAI-compatible chat endpoint (`vllm serve`, SGLang, TGI, a hosted API).

Requests go out in parallel, at most `concurrency` at a time, each with `timeout_s`;
connection errors, timeouts, 429 and 5xx are retried with exponential backoff up to
`max_retries` times, other HTTP errors fail at once with the server's message. Only the
standard library is used, so the backend works in any cluster image.

Example:
    >>> backend = HTTPBackend(SynthConfig(backend="http", model="Qwen/Qwen2.5-7B-Instruct",
    ...                                   base_url="http://127.0.0.1:8000/v1", concurrency=8))
    >>> backend.complete([[{"role": "user", "content": "Name a colour."}]], seeds=[0])
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from engine.synth.errors import SynthError
from engine.synth.config import SynthConfig

RETRY_STATUS = (408, 429, 500, 502, 503, 504)


class HTTPBackend:
    """POSTs each chat to `{base_url}/chat/completions`."""

    def __init__(self, config: SynthConfig, backoff_s: float = 0.5):
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.backoff_s = backoff_s
        self.headers = {"Content-Type": "application/json"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise SynthError(f"synth.api_key_env: environment variable {config.api_key_env} is not set")
            self.headers["Authorization"] = f"Bearer {key}"
        self.requests_sent = 0  # HTTP attempts, including transport retries

    def payload(self, chat: list[dict], seed: int) -> dict:
        c = self.config
        return {
            "model": c.model,
            "messages": chat,
            "max_tokens": c.max_tokens,
            "temperature": c.temperature,
            "top_p": c.top_p,
            "seed": int(seed),
        }

    def _post(self, body: bytes) -> dict:
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
            return json.loads(response.read())

    def complete_one(self, chat: list[dict], seed: int) -> str:
        body = json.dumps(self.payload(chat, seed)).encode("utf-8")
        last = ""
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 10.0))
            self.requests_sent += 1
            try:
                reply = self._post(body)
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code not in RETRY_STATUS:
                    raise SynthError(f"{self.url}: HTTP {e.code}: {detail}") from e
                last = f"HTTP {e.code}: {detail}"
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            try:
                return reply["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError) as e:
                raise SynthError(f"{self.url}: reply has no choices[0].message.content: {str(reply)[:300]}") from e
        raise SynthError(f"{self.url}: failed after {self.config.max_retries + 1} attempts; last error: {last}")

    def complete(self, chats: list[list[dict]], seeds: list[int]) -> list[str]:
        if not chats:
            return []
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            return list(pool.map(self.complete_one, chats, seeds))
