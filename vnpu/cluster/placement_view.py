"""What ``vnpu up`` shows: per (node, device) slices used, the models there and the memory saved by
sharing, computed from the pods the operator created and the nodes' device inventories (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vnpu import api
from vnpu.inventory import NodeInventory


@dataclass
class DeviceRow:
    node: str
    device: str
    total_slices: int
    slice_mib: int
    used_slices: int = 0
    weight_slices: int = 0
    replicas: dict[str, int] = field(default_factory=dict)  #: model -> replicas on this device
    model_slices: dict[str, int] = field(default_factory=dict)  #: model -> slices of its replicas here
    groups: dict[str, int] = field(default_factory=dict)  #: share group -> replicas on this device
    holder_slices: dict[str, int] = field(default_factory=dict)  #: share group -> its holder's slices
    holder_mib: dict[str, int] = field(default_factory=dict)  #: share group -> MiB of its weight copy

    def saved_mib(self) -> int:
        """Device memory not spent on copies: (replicas - 1) weight copies per group, as the operator's
        ``savedBySharingMiB`` counts it (the holder's slices stand in for a holder that does not say)."""
        return sum(
            max(0, n - 1) * self.holder_mib.get(g, self.holder_slices.get(g, 0) * self.slice_mib)
            for g, n in self.groups.items()
        )


def device_rows(nodes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]]) -> list[DeviceRow]:
    """Rows for every device that holds at least one vnpu pod, in (node, device) order."""
    rows: dict[tuple[str, str], DeviceRow] = {}
    for node in nodes:
        raw = (node["metadata"].get("annotations") or {}).get(api.ANNOTATION_DEVICES)
        if not raw:
            continue
        try:
            inventory = NodeInventory.from_json(raw)
        except ValueError:
            continue
        for d in inventory.devices:
            rows[(node["metadata"]["name"], d.id)] = DeviceRow(
                node["metadata"]["name"], d.id, d.slices, d.slice_mib
            )
    used: dict[tuple[str, str], DeviceRow] = {}
    for pod in pods:
        meta = pod["metadata"]
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        node = pod.get("spec", {}).get("nodeName")
        key = (node or "", annotations.get(api.ANNOTATION_DEVICE, ""))
        if key not in rows or meta.get("deletionTimestamp"):
            continue
        row = used.setdefault(key, rows[key])
        slices = api.parse_count(annotations.get(api.ANNOTATION_SLICES)) or 0
        row.used_slices += slices
        group = labels.get(api.LABEL_SHARE_GROUP, "")
        if labels.get(api.LABEL_ROLE) == api.ROLE_WEIGHTS:
            row.weight_slices += slices
            row.holder_slices[group] = slices
            if (mib := api.parse_count(annotations.get(api.ANNOTATION_WEIGHTS_MIB))) is not None:
                row.holder_mib[group] = mib
        elif labels.get(api.LABEL_ROLE) == api.ROLE_REPLICA:
            model = labels.get(api.LABEL_MODEL, "?")
            row.replicas[model] = row.replicas.get(model, 0) + 1
            row.model_slices[model] = row.model_slices.get(model, 0) + slices
            row.groups[group] = row.groups.get(group, 0) + 1
    return [used[k] for k in sorted(used)]


def render_table(rows: Sequence[DeviceRow]) -> str:
    header = ("NODE", "DEVICE", "SLICES", "MODELS (replicas)", "SAVED MiB")
    body = [
        (
            r.node,
            r.device,
            f"{r.used_slices}/{r.total_slices}",
            ", ".join(f"{m}×{n}" for m, n in sorted(r.replicas.items())) or "-",
            str(r.saved_mib()),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=False)]
    lines = [
        "  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)) for line in (header, *body)
    ]
    total = sum(r.saved_mib() for r in rows)
    lines.append(f"{len(rows)} device(s) in use; {total} MiB of device memory saved by sharing weights")
    return "\n".join(lines)


def render_png(rows: Sequence[DeviceRow], path: Path) -> Path:
    """A bar per device: slices of weight-holders and of each model's replicas, against capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for r in rows for m in r.replicas})
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 3), 4.5))
    labels = [f"{r.node}\n{r.device}" for r in rows]
    bottoms = [float(r.weight_slices) for r in rows]
    ax.bar(labels, bottoms, color="#999999", label="shared weights (holder)")
    per_model = {m: [float(r.model_slices.get(m, 0)) for r in rows] for m in models}
    for m in models:
        ax.bar(labels, per_model[m], bottom=bottoms, label=m)
        bottoms = [b + v for b, v in zip(bottoms, per_model[m], strict=True)]
    ax.plot(labels, [r.total_slices for r in rows], "k_", markersize=30, label="capacity")
    ax.set_ylabel("slices (vnpu.io/memory-<index>)")
    ax.set_title("vnpu placement")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
