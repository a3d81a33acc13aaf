"""Placeholder pods: what the Cluster Autoscaler is shown of the replicas that fit nowhere.

A placeholder is a pause pod at a negative priority (``vnpu-placeholder``) that requests slices of a
device's extended resource (``vnpu.io/memory-<index>``) with the model's nodeSelector and tolerations;
:func:`vnpu.operator.pods.render` writes it. The autoscaler simulates pending pods on its node groups'
templates by their requests, and one unit of ``vnpu.io/memory-<index>`` is one slice of *that node's*
``sliceMiB``, so a placeholder asks, in the slices of the devices it stands for, what the packer needs
for its replica on a fresh device: the weights and the replica, each rounded up to whole slices as the
packer rounds them.

The devices it stands for are those of a pool (nodes by :attr:`OperatorConfig.pool_label`) with nodes
the model may use now (its nodeSelector matches, its tolerations pass their taints), their slice size
and device size read from the device plugins' inventories. When those pools' devices differ, the
placeholders target one of them, the one that holds the replica on the fewest devices, and name its
pool in their nodeSelector, so that the autoscaler sizes no other pool by another pool's slices. No
such node known (a pool scaled to zero, a nodeSelector no node matches yet): the default slice size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vnpu import api
from vnpu.operator import packing
from vnpu.operator.packing.cluster import blocking_taints
from vnpu.operator.pods import PLACEHOLDER_DEVICE_INDEX, ModelRef, PodIntent, placeholder_pod_name


@dataclass(frozen=True)
class Target:
    """The devices a model's placeholders stand for: those of a fresh node of one pool."""

    slice_mib: int = api.DEFAULT_SLICE_MIB
    #: Slices of one such device; None when no node of the pool is known.
    device_slices: int | None = None
    #: Node labels that pin the placeholders to the pool (when the eligible pools' devices differ).
    pool_selector: Mapping[str, str] = field(default_factory=dict)


def target(
    ref: ModelRef,
    replicas: int,
    replica_mib: int,
    weight_mib: int,
    nodes: Sequence[packing.Node],
    pool_label: str,
) -> Target:
    """The devices the placeholders of ``replicas`` unplaced replicas of ``ref`` stand for, among
    ``nodes`` (the packer's: those with an inventory)."""
    placement = ref.spec.placement
    tolerations = tuple(t.for_packer() for t in placement.tolerations)
    shapes: dict[str | None, Counter[tuple[int, int]]] = {}  # pool (None: unlabelled) -> device shapes
    for n in nodes:
        if any(n.labels.get(k) != v for k, v in placement.node_selector.items()):
            continue
        if blocking_taints(n, tolerations, (packing.NO_SCHEDULE, packing.NO_EXECUTE)) or not n.devices:
            continue
        first = min(n.devices, key=lambda d: d.id)
        size = min(d.total_slices for d in n.devices if d.slice_mib == first.slice_mib)
        shapes.setdefault(n.labels.get(pool_label), Counter())[(first.slice_mib, size)] += 1
    if not shapes:
        return Target()
    # pool -> its most common device shape: (slice MiB, slices per device)
    shape_of = {pool: max(c.items(), key=lambda kv: (kv[1], kv[0]))[0] for pool, c in shapes.items()}

    def devices_needed(pool: str | None) -> tuple[bool, int, str]:
        slice_mib, size = shape_of[pool]
        w, r = api.slices_for_mib(weight_mib, slice_mib), api.slices_for_mib(replica_mib, slice_mib)
        per_device = (size - w) // r if r else replicas
        return w + r > size, -(-replicas // max(1, per_device)), pool or ""

    pool = min(shape_of, key=devices_needed)
    slice_mib, size = shape_of[pool]
    pin = len(set(shape_of.values())) > 1 and pool is not None
    return Target(slice_mib, size, {pool_label: pool} if pin and pool is not None else {})


def plan_placeholders(
    ref: ModelRef, unplaced: Sequence[packing.Unplaced], nodes: Sequence[packing.Node], pool_label: str
) -> list[PodIntent]:
    """The placeholders of the unplaced replicas of ``ref``."""
    if not unplaced:
        return []
    replica_mib, weight_mib = unplaced[0].replica_mib, unplaced[0].weight_mib
    t = target(ref, len(unplaced), replica_mib, weight_mib, nodes, pool_label)
    slices = api.slices_for_mib(weight_mib, t.slice_mib) + api.slices_for_mib(replica_mib, t.slice_mib)
    return [
        PodIntent(
            api.ROLE_PLACEHOLDER,
            ref.namespace,
            placeholder_pod_name(ref.name, u.replica),
            (ref,),
            slices,
            api.device_resource(PLACEHOLDER_DEVICE_INDEX),
            replica=u.replica,
            pool_selector=tuple(sorted(t.pool_selector.items())),
        )
        for u in unplaced
    ]
