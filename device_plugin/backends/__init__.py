"""Device backends: discover the node's accelerators and their health behind one interface.

``ascend`` parses ``npu-smi`` output, ``nvidia`` queries NVML (nvidia-ml-py, imported lazily),
``simulated`` reads devices from a config file or a short spec (the default without an accelerator).
"""

from vnpu.device_plugin.backends.base import Backend, BackendError, DeviceNode, PhysicalDevice, create_backend

__all__ = ["Backend", "BackendError", "DeviceNode", "PhysicalDevice", "create_backend"]
