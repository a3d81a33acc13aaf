"""The vnpu kubelet device plugin: advertises each accelerator's memory as ``vnpu.io/memory`` slices.

Layout (one module per responsibility; pure logic apart from I/O):

* :mod:`.contract` — what a container receives (env names, the share-group socket mount): read by the runtime.
* :mod:`.backends` — device discovery and health (``ascend``, ``nvidia``, ``simulated``) behind one interface.
* :mod:`.devices` — the live device table (polls a backend, keeps health, versions every change).
* :mod:`.placement` — pure slice choice for GetPreferredAllocation and validation for Allocate.
* :mod:`.ledger` — which slices are allocated, checkpointed to disk, reconciled after restarts.
* :mod:`.pods` — the pending pods on this node (watch on the API server), matched to allocations.
* :mod:`.service` — the gRPC ``DevicePlugin`` servicer; :mod:`.registration` — kubelet registration
  and re-registration when the kubelet restarts; :mod:`.plugin` wires everything together.
* :mod:`.annotator`, :mod:`.metrics`, :mod:`.podresources` — node annotation, Prometheus metrics,
  the kubelet pod-resources client.
* :mod:`.main` — ``vnpu device-plugin``.
"""
