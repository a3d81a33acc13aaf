"""OpenAI's error object: how the runtime and the gateway both answer a request they refuse.

Torch-free, so the gateway (which must not import the runtime's model code) shares it.
"""

from __future__ import annotations

from typing import Any


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """``{"error": {message, type, param, code}}``, as OpenAI's API answers."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


#: A request refused because nothing can serve it now (no replica, a drain, a full queue): the runtime's
#: 503 body and its mid-stream error event, and the gateway's, all say it one way.
SERVER_ERROR = "server_error"
SERVICE_UNAVAILABLE = "service_unavailable"
