"""Registering with the kubelet, and noticing when the kubelet restarts.

On start the kubelet deletes every socket in its device-plugin directory (its own checkpoint aside)
and creates ``kubelet.sock`` afresh. :class:`KubeletWatch` polls both files: when the plugin's own
socket is gone the gRPC server must be rebound, and when ``kubelet.sock`` is a new file (different
inode or change time) the plugin must register again. Polling every 0.2 s keeps re-registration
well under the 2 s the plugin promises, without an inotify dependency.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

from vnpu.device_plugin.proto import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
KUBELET_SOCKET_NAME = "kubelet.sock"
DEFAULT_PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")

FileIdentity = tuple[int, int, int]


def file_identity(path: Path) -> FileIdentity | None:
    """(device, inode, ctime) of ``path``, or None when it does not exist: a re-created file differs."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def register(plugin_dir: Path, endpoint: str, resource_name: str, *, timeout_s: float = 10.0) -> None:
    """Call ``Registration.Register`` on ``<plugin_dir>/kubelet.sock``. The kubelet dials the plugin's
    socket during the call, so the plugin's server must already be serving. Fails fast (UNAVAILABLE)
    when nothing listens on ``kubelet.sock``. Raises grpc.RpcError."""
    target = f"unix://{(plugin_dir / KUBELET_SOCKET_NAME).resolve()}"
    with grpc.insecure_channel(target) as channel:
        api_pb2_grpc.RegistrationStub(channel).Register(
            api_pb2.RegisterRequest(
                version=API_VERSION,
                endpoint=endpoint,
                resource_name=resource_name,
                options=api_pb2.DevicePluginOptions(
                    pre_start_required=False, get_preferred_allocation_available=True
                ),
            ),
            timeout=timeout_s,
        )
