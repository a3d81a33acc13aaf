"""Optional API keys: which client may call which models.

The keys file is a Secret mounted into the gateway (``--api-keys``). Without it every request is let
through (the gateway then sits behind your own authentication, as a Service in the cluster usually
does). With it, a request needs ``Authorization: Bearer <key>`` and one of the key's ``models`` patterns
(shell-style: ``team-a/*``, ``*``) must match the model: its ``<namespace>/<modelName>``, or, for a
pattern without '/', its bare modelName too. A pattern with '/' names namespaces: matched against bare
names as well, it would match another tenant's model whose modelName starts ``team-a/`` (a modelName
may hold '/'), which could then take team-a's key's requests or make its names ambiguous. So
``team-a/*`` is all of namespace team-a and nothing else; to name a model whose modelName holds '/',
qualify it: ``team-a/meta-llama/Llama-3.1-8B``. A key is stored as its SHA-256 (``sha256``) or, less
safely, in the clear (``key``); the gateway keeps only digests and compares them in constant time::

    keys:
      - name: team-a-app
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        models: ["team-a/*"]
      - name: ops
        key: s3cr3t
        models: ["*"]

A request may carry a ``priority`` (higher is more important: under memory pressure a replica
preempts its lowest-priority sequences first). With keys, a request may ask for no more than its
model's own ``spec.priority``, or the key's ``maxPriority`` where that is higher; asking for more is a
403. Without the limit, any client of a model could push every other client's sequences out::

      - name: pager-bot
        sha256: ...
        models: ["team-a/*"]
        maxPriority: 100

A key that may not call a model gets the same 404 as a model that does not exist: no caller learns
what other tenants serve. For the same reason ``/metrics``, which names every model, needs a key whose
``models`` hold ``*`` (scrape it with that key as the bearer token).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vnpu.gateway.routing import Route


class KeyFileError(ValueError):
    """The keys file cannot be used (the message names the entry and the field)."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  #: SHA-256 of the key
    models: tuple[str, ...]
    #: The highest request priority the key may ask for (None: its model's own spec.priority).
    max_priority: int | None = None

    def priority_limit(self, model_priority: int) -> int:
        """The highest priority this key's requests to a model of ``model_priority`` may carry."""
        return model_priority if self.max_priority is None else max(model_priority, self.max_priority)

    @property
    def sees_every_model(self) -> bool:
        """Whether the key may call every model (its patterns hold ``*``): only such a key may read
        what names them all."""
        return "*" in self.models

    def allows(self, route: Route) -> bool:
        """Whether any pattern matches the model: its qualified name, or its bare name for a pattern
        without '/' (one with '/' names namespaces; see the module's docstring)."""
        return any(
            fnmatch.fnmatchcase(route.qualified_name, p)
            or ("/" not in p and fnmatch.fnmatchcase(route.model_name, p))
            for p in self.models
        )


def _digest(text: str) -> bytes:
    """SHA-256 of the key's bytes. aiohttp hands over a header that is not UTF-8 with its bytes kept as
    surrogate escapes: hashed as those bytes, it matches no key (a 401, never a 500)."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def parse_keys(data: Any) -> tuple[ApiKey, ...]:
    """The keys of a parsed keys file; raises KeyFileError naming what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeyFileError("the API keys file must be a mapping with a 'keys' list")
    keys = []
    for i, entry in enumerate(data["keys"]):
        where = f"keys[{i}]"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{where} must be a mapping")
        name = str(entry.get("name") or where)
        if ("key" in entry) == ("sha256" in entry):
            raise KeyFileError(f"{where} ({name}) needs exactly one of 'key' or 'sha256'")
        if "key" in entry:
            if not isinstance(entry["key"], str) or len(entry["key"]) < 8:
                raise KeyFileError(f"{where} ({name}): 'key' must be a string of at least 8 characters")
            digest = _digest(entry["key"])
        else:
            try:
                digest = bytes.fromhex(str(entry["sha256"]))
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise KeyFileError(f"{where} ({name}): 'sha256' must be 64 hex characters")
        models = entry.get("models")
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise KeyFileError(f"{where} ({name}): 'models' must be a non-empty list of model name patterns")
        max_priority = entry.get("maxPriority")
        if max_priority is not None and (
            not isinstance(max_priority, int) or isinstance(max_priority, bool) or abs(max_priority) >= 2**31
        ):
            raise KeyFileError(f"{where} ({name}): 'maxPriority' must be a 32-bit integer")
        keys.append(ApiKey(name, digest, tuple(models), max_priority))
    return tuple(keys)


class KeyRing:
    """The keys of a file, re-read when the file changes (a Secret update reaches the mount).

    The file is checked on every request that needs a key, so what was read is remembered by the
    file's stamp whether it was good or not: a file that turned bad, or went (a deleted Secret), is
    reported once and not read again until it changes, while the last good keys keep serving. It was
    re-read, re-parsed and logged at ERROR on every request, a log line any client without a key
    could make."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        #: the file's (inode, mtime) when last read, good or bad; ("unreadable", errno) when os.stat failed
        self._seen: tuple[object, object] | None = None
        self._keys: tuple[ApiKey, ...] = ()
        if path is not None:
            self.reload()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def reload(self) -> None:
        """Read the file if it changed. A file that turned bad, went or cannot be read keeps the last
        good keys and raises (KeyFileError, OSError) once: until it changes, it is neither read nor
        reported again."""
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError as exc:
            gone = ("unreadable", exc.errno)
            if gone == self._seen:
                return
            self._seen = gone
            raise
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp == self._seen:
            return
        self._seen = stamp
        try:
            keys = parse_keys(yaml.safe_load(self.path.read_text()))
        except yaml.YAMLError as exc:
            raise KeyFileError(f"the API keys file {self.path} is not YAML: {exc}") from exc
        self._keys = keys

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The key a request's ``Authorization: Bearer <key>`` header presents, or None."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        presented = _digest(authorization.removeprefix("Bearer ").strip())
        found = None
        for key in self._keys:  # compare with every key, in constant time each
            if hmac.compare_digest(presented, key.digest):
                found = key
        return found
