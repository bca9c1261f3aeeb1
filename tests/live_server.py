"""A live uvicorn serving one engine on 127.0.0.1, driven by the stock openai client (tests)."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import uvicorn

from w2s_engine import Engine
from w2s_engine.serve.async_engine import AsyncEngine
from w2s_engine.serve.server import create_app, parse_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, engine: Engine, model_name="tiny", **app_options):
        """app_options: create_app's (max_body_bytes, allowed_hosts, max_prompt_chars,
        api_key, allowed_origins)."""
        self.async_engine = AsyncEngine(engine)
        self.port = free_port()
        config = uvicorn.Config(create_app(self.async_engine, model_name, **app_options),
                                host="127.0.0.1", port=self.port, log_level="warning",
                                log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = app_options.get("api_key") or "none"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key,
                                    max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key,
                                  max_retries=0)

    def metrics_text(self) -> str:
        req = urllib.request.Request(self.url + "/metrics",
                                     headers={"Authorization": f"Bearer {self.api_key}"})
        return urllib.request.urlopen(req).read().decode()

    def metrics(self) -> dict:
        return parse_metrics(self.metrics_text())

    def post(self, path: str, body: bytes):
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), dict(e.headers)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.async_engine.shutdown()
