"""A local OpenAI-compatible HTTP server for tests: scripted replies, errors, delays.

It speaks the chat-completions wire format over real HTTP (JSON, or SSE when the
request asks to stream), so the real OpenAI client is exercised end to end.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAI:
    def __init__(self, replies: list[dict[str, Any]]) -> None:
        self.replies: deque[dict[str, Any]] = deque(replies)
        self.requests: list[dict[str, Any]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.endswith("/models"):
                    self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                try:
                    self._answer()
                except BrokenPipeError:
                    pass  # the client gave up (the timeout case): nothing to answer

            def _answer(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                reply = fake.replies.popleft() if fake.replies else {"status": 500}
                if "sleep" in reply:
                    time.sleep(reply["sleep"])
                    reply = {"content": "too late"}
                if "status" in reply:
                    self._json(reply["status"], {"error": {"message": "upstream exploded", "type": "server_error"}})
                elif reply.get("malformed"):
                    self._raw(200, b'{"choices": [ this is not json', "application/json")
                elif body.get("stream"):
                    self._sse(body, reply)
                else:
                    self._json(200, self._completion(body, reply))

            def _message(self, reply: dict[str, Any]) -> dict[str, Any]:
                message: dict[str, Any] = {"role": "assistant", "content": reply.get("content")}
                if reply.get("tool_calls"):
                    message["tool_calls"] = [
                        {"id": f"call_{n}", "type": "function", "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))}}
                        for n, c in enumerate(reply["tool_calls"])
                    ]
                return message

            def _completion(self, body: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
                return {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body.get("model", "fake-model"),
                    "choices": [{"index": 0, "finish_reason": "tool_calls" if reply.get("tool_calls") else "stop", "message": self._message(reply)}],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
                }

            def _sse(self, body: dict[str, Any], reply: dict[str, Any]) -> None:
                def chunk(delta: dict[str, Any], finish: str | None, usage: dict | None = None) -> bytes:
                    data = {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": body.get("model", "fake-model"),
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else [],
                    }
                    if usage:
                        data["usage"] = usage
                    return b"data: " + json.dumps(data).encode() + b"\n\n"

                frames = [chunk({"role": "assistant", "content": ""}, None)]
                content = reply.get("content") or ""
                for start in range(0, len(content), 8):
                    frames.append(chunk({"content": content[start : start + 8]}, None))
                for n, call in enumerate(reply.get("tool_calls") or []):
                    frames.append(
                        chunk(
                            {"tool_calls": [{"index": n, "id": f"call_{n}", "type": "function",
                                             "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}}]},
                            None,
                        )
                    )
                frames.append(chunk({}, "tool_calls" if reply.get("tool_calls") else "stop"))
                frames.append(chunk(None, None, {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}))
                frames.append(b"data: [DONE]\n\n")
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(sum(len(f) for f in frames)))
                self.end_headers()
                for frame in frames:
                    self.wfile.write(frame)

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                self._raw(status, json.dumps(payload).encode(), "application/json")

            def _raw(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
