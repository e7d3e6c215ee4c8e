"""The HTTP side of ComfyUI's API, over urllib (stdlib): queue, history, interrupt, files.

Endpoints (ComfyUI server.py): POST /prompt {"prompt", "client_id"} -> {"prompt_id", "number",
"node_errors"} or HTTP 400 {"error": {...}, "node_errors": {...}}; GET /history/<id> -> {id: entry}
once the prompt finished (entry: "outputs", "status": {"status_str", "completed", "messages"});
POST /interrupt {"prompt_id"} stops it if it is running; POST /queue {"delete": [id]} drops it if
it is still waiting; GET /view?filename=&subfolder=&type= serves a file; GET /queue answers cheaply.
"""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:8188"


class ServerUnreachable(ConnectionError):
    """No answer from the server at all (refused, DNS, timeout): reported in one line, exit 2."""


class PromptRefused(Exception):
    """POST /prompt answered an HTTP error; `body` is ComfyUI's JSON (`error`, `node_errors`)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"POST /prompt -> HTTP {status}")
        self.status = status
        self.body = body


def normalize_server(server: str) -> str:
    """`127.0.0.1:8188` -> `http://127.0.0.1:8188`; no trailing slash; only http(s)."""
    url = server.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--server {server!r}: expected an http(s) URL such as {DEFAULT_SERVER}")
    return url


class ComfyHTTP:
    """Calls to one server; every network failure becomes ServerUnreachable naming the URL."""

    def __init__(self, server: str, timeout: float = 30.0) -> None:
        self.url = normalize_server(server)
        self.timeout = timeout

    def ws_url(self, client_id: str) -> str:
        """The websocket address for `client_id` (ws:// or wss:// to match the server URL)."""
        scheme = "wss" if self.url.startswith("https") else "ws"
        return f"{scheme}{self.url[self.url.index(':'):]}/ws?clientId={urllib.parse.quote(client_id)}"

    def raw(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """(HTTP status, body bytes); HTTP errors are returned, network errors raised."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError, socket.timeout) as e:
            reason = getattr(e, "reason", e)
            raise ServerUnreachable(f"cannot reach ComfyUI at {self.url} ({reason}); start ComfyUI "
                                    "(python main.py) or pass --server URL") from None

    def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(HTTP status, decoded JSON, or the text when it is not JSON)."""
        status, raw = self.raw(method, path, body)
        text = raw.decode("utf-8", "replace")
        try:
            return status, (json.loads(text) if text else None)
        except json.JSONDecodeError:
            return status, text

    def _ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.json(method, path, body)
        if status != 200:
            raise RuntimeError(f"{method} {self.url}{path} -> HTTP {status}: {str(answer)[:500]}")
        return answer

    def check(self) -> None:
        """Raise ServerUnreachable unless the server answers (GET /queue)."""
        self._ok("GET", "/queue")

    def queue_prompt(self, workflow: dict, client_id: str) -> str:
        """POST /prompt; the prompt id, or PromptRefused with ComfyUI's validation errors."""
        status, answer = self.json("POST", "/prompt", {"prompt": workflow, "client_id": client_id})
        if status != 200 or not isinstance(answer, dict) or "prompt_id" not in answer:
            raise PromptRefused(status, answer)
        return str(answer["prompt_id"])

    def history_entry(self, prompt_id: str) -> dict | None:
        """The finished prompt's history entry, or None while it is queued or running."""
        answer = self._ok("GET", f"/history/{urllib.parse.quote(prompt_id)}")
        entry = answer.get(prompt_id) if isinstance(answer, dict) else None
        return entry if isinstance(entry, dict) else None

    def interrupt(self, prompt_id: str) -> None:
        """Stop `prompt_id`: interrupt it if running, drop it from the queue if waiting."""
        self.raw("POST", "/interrupt", {"prompt_id": prompt_id})
        self.raw("POST", "/queue", {"delete": [prompt_id]})

    def view(self, filename: str, subfolder: str, kind: str) -> bytes:
        """GET /view: the bytes of an output/temp/input file."""
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": kind})
        status, data = self.raw("GET", f"/view?{query}")
        if status != 200:
            raise RuntimeError(f"GET {self.url}/view?{query} -> HTTP {status}")
        return data
