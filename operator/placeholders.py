"""Placeholder pods: what the Cluster Autoscaler is shown of the replicas that fit nowhere.

A placeholder is a pause pod at a negative priority (``vnpu-placeholder``) that requests slices of a
device's extended resource (``vnpu.io/memory-<index>``) with the model's nodeSelector and tolerations;
:func:`vnpu.operator.pods.render` writes it. The autoscaler simulates pending pods on its node groups'
templates by their requests, and one unit of ``vnpu.io/memory-<index>`` is one slice of *that node's*
``sliceMiB``, so the placeholders of a model ask, in the slices of the devices they stand for, what the
packer needs for its unplaced replicas on fresh devices: one placeholder per device-worth (the weights
once, each replica beside them, each part rounded up to whole slices as the packer rounds it), the
``i``-th on device ``i`` mod the devices of a node. The autoscaler's estimator then fits a node's worth
of them on one new node, as the packer fills a node's devices, instead of a node per replica.

The devices they stand for are those of a pool (nodes by :attr:`OperatorConfig.pool_label`) with nodes
the model may use now (its nodeSelector matches, its tolerations pass their taints), their slice size
and device size read from the device plugins' inventories. When those pools' devices differ, the
placeholders target one of them, one whose device holds a replica, on the fewest nodes, and name its
pool in their nodeSelector (the nodes without the pool label: a node affinity that the label does
not exist), so that the autoscaler sizes no other pool by another pool's slices. No
such node known (a pool scaled to zero, a nodeSelector no node matches yet): the default slice size
and one replica per placeholder, as for a model that spreads across nodes.

A model has at most :data:`MAX_PER_MODEL` placeholders: a replica count the CRD allows (1,000) of a
size no known device holds would be 1,000 pending pods per model, in every pass's plan. The
autoscaler sizes a scale-up from those it is shown; once they are placed, the next ones follow.

A placeholder's name carries a hash of what it requests and where it may run (:func:`_shape`): when a
model's size, nodeSelector, tolerations or pool change, the plan's placeholders have new names, and the
old ones, no longer in the plan, are deleted.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vnpu import api
from vnpu.operator import packing
from vnpu.operator.packing import Spread
from vnpu.operator.packing.cluster import blocking_taints
from vnpu.operator.pods import PLACEHOLDER_DEVICE_INDEX, ModelRef, PodIntent, placeholder_pod_name

#: Placeholders of one model at most (device-worths, or replicas when one each).
MAX_PER_MODEL = 64


@dataclass(frozen=True)
class Target:
    """The devices a model's placeholders stand for: those of a fresh node of one pool."""

    slice_mib: int = api.DEFAULT_SLICE_MIB
    #: Slices of one such device; None when no node of the pool is known.
    device_slices: int | None = None
    #: Devices of one such node.
    devices: int = 1
    #: Node labels that pin the placeholders to the pool (when the eligible pools' devices differ).
    pool_selector: Mapping[str, str] = field(default_factory=dict)
    #: The pool label a node must not have: the target is the unlabelled nodes (pinned likewise).
    pool_absent: str = ""


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
    # pool (None: unlabelled) -> its nodes' shapes: (slice MiB, slices per device, devices)
    shapes: dict[str | None, Counter[tuple[int, int, int]]] = {}
    for n in nodes:
        if any(n.labels.get(k) != v for k, v in placement.node_selector.items()):
            continue
        if blocking_taints(n, tolerations, (packing.NO_SCHEDULE, packing.NO_EXECUTE)) or not n.devices:
            continue
        first = min(n.devices, key=lambda d: d.id)
        size = min(d.total_slices for d in n.devices if d.slice_mib == first.slice_mib)
        shapes.setdefault(n.labels.get(pool_label), Counter())[(first.slice_mib, size, len(n.devices))] += 1
    if not shapes:
        return Target()
    shape_of = {pool: max(c.items(), key=lambda kv: (kv[1], kv[0]))[0] for pool, c in shapes.items()}

    def needed(pool: str | None) -> tuple[bool, int, int, str]:
        """(the replica does not fit a device, nodes, devices) the replicas take on fresh nodes."""
        slice_mib, size, devices = shape_of[pool]
        w, r = api.slices_for_mib(weight_mib, slice_mib), api.slices_for_mib(replica_mib, slice_mib)
        per_device = (size - w) // r if r else replicas
        used = -(-replicas // max(1, per_device))
        return w + r > size, -(-used // devices), used, pool or ""

    pool = min(shape_of, key=needed)
    slice_mib, size, devices = shape_of[pool]
    if len(set(shape_of.values())) == 1:
        return Target(slice_mib, size, devices)
    if pool is None:  # the unlabelled nodes: a placeholder sized in their slices must not land elsewhere
        return Target(slice_mib, size, devices, pool_absent=pool_label)
    return Target(slice_mib, size, devices, {pool_label: pool})


@dataclass(frozen=True)
class Placeholders:
    """A model's placeholders, and the slices all of its unplaced replicas ask in their layout (the
    ``vnpu_operator_unplaced_slices`` gauge: past :data:`MAX_PER_MODEL`, more than the pods request)."""

    intents: list[PodIntent]
    slices: int


def plan_placeholders(
    ref: ModelRef, unplaced: Sequence[packing.Unplaced], nodes: Sequence[packing.Node], pool_label: str
) -> Placeholders:
    """The placeholders of the unplaced replicas of ``ref``: one per device-worth of them (the weights
    and as many replicas as a device of the target holds, the rest in a last one), the ``i``-th on
    device ``i`` mod the devices of a node, so the autoscaler fits them on as many nodes as the packer
    would fill. A model that spreads across nodes, or a target unknown or too small for one replica:
    one replica each, on a node's first device. :data:`MAX_PER_MODEL` at most."""
    if not unplaced:
        return Placeholders([], 0)
    replica_mib, weight_mib = unplaced[0].replica_mib, unplaced[0].weight_mib
    t = target(ref, len(unplaced), replica_mib, weight_mib, nodes, pool_label)
    w, r = api.slices_for_mib(weight_mib, t.slice_mib), api.slices_for_mib(replica_mib, t.slice_mib)
    per, devices = 1, 1
    if t.device_slices is not None and w + r <= t.device_slices and ref.spec.placement.spread == Spread.NONE:
        per, devices = (t.device_slices - w) // r if r else len(unplaced), t.devices
    pool_selector = tuple(sorted(t.pool_selector.items()))
    out = []
    shapes: dict[tuple[int, str], str] = {}  # (slices, resource) -> its shape: a few per model
    for i, first in enumerate(range(0, min(len(unplaced), per * MAX_PER_MODEL), per)):
        slices = w + min(per, len(unplaced) - first) * r
        resource = api.device_resource(PLACEHOLDER_DEVICE_INDEX + i % devices)
        shape = shapes.get((slices, resource))
        if shape is None:
            shape = shapes[(slices, resource)] = _shape(ref, slices, resource, pool_selector, t.pool_absent)
        out.append(
            PodIntent(
                api.ROLE_PLACEHOLDER,
                ref.namespace,
                placeholder_pod_name(ref.name, i, shape),
                (ref,),
                slices,
                resource,
                replica=i,
                pool_selector=pool_selector,
                pool_absent=t.pool_absent,
            )
        )
    return Placeholders(out, -(-len(unplaced) // per) * w + len(unplaced) * r)


def _shape(
    ref: ModelRef, slices: int, resource: str, pool_selector: tuple[tuple[str, str], ...], pool_absent: str
) -> str:
    """What a placeholder requests and where it may run, for its name: a placeholder whose size,
    nodeSelector, tolerations or pool changed is replaced, never kept for the old ones."""
    placement = ref.spec.placement
    return json.dumps(
        [
            slices,
            resource,
            sorted({**placement.node_selector, **dict(pool_selector)}.items()),
            [t.manifest() for t in placement.tolerations],
            *([pool_absent] if pool_absent else []),  # (names without it are those they always were)
        ],
        sort_keys=True,
    )
