"""Keeps the node annotation ``vnpu.io/devices`` equal to the device table's inventory.

Wakes on every device-table change and on :meth:`NodeAnnotator.refresh` (and resyncs periodically in
case someone edited the node), patches only when the JSON differs from what it last wrote, and retries
with backoff on API errors (node not registered yet, API server down). A device the kubelet was not
offered (its endpoint could not be set up) is written Unhealthy with why: the operator plans from this
annotation, and a resource no node advertises would only leave its pods Pending.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from vnpu.api import ANNOTATION_DEVICES
from vnpu.device_plugin.devices import DeviceTable
from vnpu.inventory import HEALTHY, UNHEALTHY, NodeInventory

log = logging.getLogger(__name__)


class NodeAnnotator:
    def __init__(
        self,
        core_api: Any,
        node_name: str,
        table: DeviceTable,
        *,
        resync_s: float = 60.0,
        unserved: Callable[[], Mapping[str, str]] = dict,
    ) -> None:
        self.api = core_api
        self.node_name = node_name
        self.table = table
        self.resync_s = resync_s
        #: device id -> why the kubelet was not offered its resource
        self.unserved = unserved
        self.last_written: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # stop, or refresh
        self._thread: threading.Thread | None = None

    def inventory(self) -> NodeInventory:
        """The table's inventory, with each device the kubelet was not offered marked Unhealthy."""
        unserved = self.unserved()
        return NodeInventory(
            tuple(
                replace(d, health=UNHEALTHY, reason=f"not offered to the kubelet: {unserved[d.id]}")
                if d.id in unserved and d.health == HEALTHY
                else d
                for d in self.table.inventory().devices
            )
        )

    def refresh(self) -> None:
        """Look again now (what :attr:`unserved` returns changed)."""
        self._wake.set()
        self.table.wake_watchers()

    def sync_once(self) -> bool:
        """Write the annotation if it differs from the node's; True when the node is up to date."""
        from kubernetes.client.exceptions import ApiException

        if not self.table.reported:  # the backend not heard yet: the annotation stays as it was
            return True
        wanted = self.inventory().to_json()
        try:
            node = self.api.read_node(self.node_name, _request_timeout=10)
            current = (node.metadata.annotations or {}).get(ANNOTATION_DEVICES)
            if current != wanted:
                self.api.patch_node(
                    self.node_name,
                    {"metadata": {"annotations": {ANNOTATION_DEVICES: wanted}}},
                    _request_timeout=10,
                )
                log.info(
                    "node annotation updated",
                    extra={"node": self.node_name, "annotation": ANNOTATION_DEVICES},
                )
        except (ApiException, OSError) as exc:
            log.warning(
                "cannot update node annotation; will retry",
                extra={"node": self.node_name, "error": str(exc)[:300]},
            )
            return False
        except Exception as exc:  # urllib3 connection errors and the like
            log.warning(
                "cannot update node annotation; will retry",
                extra={"node": self.node_name, "error": repr(exc)[:300]},
            )
            return False
        self.last_written = wanted
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vnpu-annotator", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            version = self.table.version
            self._wake.clear()  # before looking: a refresh from now on is seen by the wait below
            if self.sync_once():
                backoff = 0.5
                self.table.wait_for_change(version, timeout=self.resync_s, stop=self._wake)
            else:
                self._wake.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.table.wake_watchers()
        if self._thread is not None:
            self._thread.join(timeout=5)
