"""A PersistentVolumeClaim backed by a host directory, pre-bound to its PersistentVolume.

Model pods mount ``pvc://<claim>/...`` sources as claims; on a local control plane there is no storage
provisioner, so ``vnpu up`` and the tests make the claim themselves (the controller-manager's
persistent-volume binder completes the pre-binding).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def local_claim_manifests(
    namespace: str, claim: str, host_path: Path, size: str = "10Gi"
) -> list[dict[str, Any]]:
    volume = f"{claim}-{namespace}"
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume, "labels": {"app.kubernetes.io/managed-by": "vnpu-local"}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": ["ReadOnlyMany", "ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": str(host_path), "type": "DirectoryOrCreate"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": size}},
            },
        },
    ]


def ensure_local_claim(control_plane: Any, namespace: str, claim: str, host_path: Path) -> None:
    """Apply the PV/PVC pair and wait until the claim is Bound."""
    host_path.mkdir(parents=True, exist_ok=True)
    docs = {"apiVersion": "v1", "kind": "List", "items": local_claim_manifests(namespace, claim, host_path)}
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(docs))
    control_plane.kubectl(
        "wait", "-n", namespace, "--for=jsonpath={.status.phase}=Bound", f"pvc/{claim}", "--timeout=60s"
    )
