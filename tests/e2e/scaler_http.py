"""Talking to the stack's scaler from the host, over its port published on 127.0.0.1."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from compose_project import ComposeProject


def env_value(stack: ComposeProject, name: str) -> str:
    """A variable as the stack sees it: exported wins over the env file, as in Compose."""
    if name in stack.env:
        return stack.env[name]
    for line in stack.env_file.read_text().splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1]
    raise KeyError(f"{name}: neither exported nor in {stack.env_file}")


def http(
    stack: ComposeProject, method: str, path: str, token: str | None = None, body: bytes = b""
) -> tuple[int, str]:
    """One request to the scaler: (status, body), error statuses included."""
    url = f"http://127.0.0.1:{env_value(stack, 'SCALER_HTTP_PORT_HOST')}{path}"
    request = urllib.request.Request(url, method=method, data=body if method == "POST" else None)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def status(stack: ComposeProject) -> dict[str, Any]:
    """The scaler's /status snapshot."""
    code, body = http(stack, "GET", "/status")
    assert code == 200, body
    result: dict[str, Any] = json.loads(body)
    return result
