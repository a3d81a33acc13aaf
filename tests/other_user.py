"""Run a function as another, unprivileged user in a forked child, the way a tenant's container on
the same node reaches a shared directory: without root's right to read or unlink anything. The child
needs no imports (the parent's modules are already loaded), so a venv that user cannot read is no
obstacle. The tests that use it run as root, and skip otherwise."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest

#: Unprivileged uids no process of the test machine runs as (share_uid's range starts far above).
TENANT_UID = 64001
OTHER_TENANT_UID = 64002

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


def run_as(uid: int, action: Callable[[], Any]) -> Any:
    """``action()`` as ``uid`` (its gid too, no supplementary groups) in a forked child; its JSON-able
    result, or ``{"error": "<type>: <message>", "errno": n}`` for an exception it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                result = action()
            except Exception as e:
                result = {"error": f"{type(e).__name__}: {e}", "errno": getattr(e, "errno", None)}
            os.write(write_end, json.dumps(result).encode())
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()  # EOF when the child exits
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, f"the child as uid {uid} failed: {status}"
    return json.loads(data)
