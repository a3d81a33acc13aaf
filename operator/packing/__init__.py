"""Share-aware packing of model replicas onto (node, device) pairs: pure, deterministic, no Kubernetes.

Cost model (DESIGN.md "Placement"): the first replica of a share group on a device pays the group's
weights + its own KV/activation; every further replica of that group on that device pays only its own
part. The weights live in a weight-holder pod per (device, group), sized to the weights' slices. A
device may say its group's weights are there already (``Device.loaded``: a holder outside the problem,
its slices not free, e.g. the one a rolling update's old replicas map): that group's replicas pay only
their own part on it.

Algorithm, per priority level from the highest down:

1. Kept placements (``current``) are validated and committed first, highest priority first, so running
   replicas stay where they are (unless ``defragment=True``); then ``offered`` ones (replicas not running
   yet, offered a device) where they still fit.
2. Demands with ``spreadAcrossNodes`` are placed replica by replica on the nodes that hold the fewest
   replicas of that model (best effort: distinct nodes while possible, then the least-loaded ones;
   ``Spread.HARD``: distinct nodes or unplaced). Within a node, a device already holding the group's
   weights is preferred, then the tightest device with room for weights + replica.
3. Other demands are packed best-fit-decreasing by *chunk*: a demand first fills the devices already
   holding its weights (each replica costs only its own slices there), then opens the largest chunk
   ``weights + k·replica`` that the emptiest eligible device can take on the tightest device that fits
   it. Chunks of all demands of a level are taken largest first (a lazy priority queue).
4. A replica that fits nowhere may preempt placements of strictly lower priority of its own tenant
   (``Demand.tenant``; kept ones: newly placed lower levels are not placed yet) on the device where
   that evicts the least; evicted replicas are re-placed at their own level or reported unplaced.
5. A local-improvement pass empties lightly used devices by moving their new replicas into the room
   left on other used devices (never moving kept replicas), then replica indices are matched to the
   current placements so a replica that stays on its device keeps its index. A defragmenting repack
   first renames its devices onto interchangeable running ones, where most of their replicas already
   run (:mod:`vnpu.operator.packing.align`), so it restarts only what must move.

Defragmentation in the operator is :func:`drain`: a few devices, cordoned, their replicas re-placed
into room that is free now (each move make-before-break), within a move budget.

The plan returned is the best (fewest unplaced replicas by priority, then fewest devices, slices and
moves) of several runs from the same kept state: (A) the share-aware packing above; (B) a share-blind
best-fit-decreasing by replica, re-accounted with sharing and completed like A, which makes "sharing
never costs more than not sharing" hold by construction; and, when few replicas are to be placed, up
to 64 randomised variants of A with fixed seeds (jittered chunk order, chunks balanced across devices
or split to fill gaps), which find the exact optimum on the small mixes where the greedy order misses
it. In the steady state (nothing new to place) only A runs.

Unplaced replicas come with a code and a message (``no node matches nodeSelector``, ``insufficient
memory: needs 9 slices, largest free 6``, ...). Cost: building the indexes is O(devices · distinct
eligibility signatures); a chunk or replica placement is O(slice values) via per-signature free-slice
buckets, so 10,000 replicas on 8,000 devices pack in well under two seconds (see bench/packing.py).

Capacity bookkeeping is per device in that device's own slices (``slice_mib`` may differ per node), so
demands are given in MiB and converted per device with :func:`vnpu.api.slices_for_mib`.
"""

from vnpu.operator.packing.drain import DRAIN_TRIES, WeightCopy, drain, waste_by_device, weight_copies
from vnpu.operator.packing.inputs import (
    NO_EXECUTE,
    NO_SCHEDULE,
    PREFER_NO_SCHEDULE,
    Demand,
    Device,
    Node,
    Placement,
    Spread,
    Taint,
    Toleration,
    group_weight_mib,
)
from vnpu.operator.packing.outputs import (
    Assignment,
    Dropped,
    PackResult,
    Reason,
    Unplaced,
    WeightHolder,
)
from vnpu.operator.packing.plans import (
    CONSOLIDATE_BOUND,
    MIN_SLICES_PER_MOVE,
    VARIANT_BUDGET,
    VARIANTS,
    consolidate,
    pack,
)

__all__ = [
    "CONSOLIDATE_BOUND",
    "DRAIN_TRIES",
    "MIN_SLICES_PER_MOVE",
    "NO_EXECUTE",
    "NO_SCHEDULE",
    "PREFER_NO_SCHEDULE",
    "VARIANTS",
    "VARIANT_BUDGET",
    "Assignment",
    "Demand",
    "Device",
    "Dropped",
    "Node",
    "PackResult",
    "Placement",
    "Reason",
    "Spread",
    "Taint",
    "Toleration",
    "Unplaced",
    "WeightCopy",
    "WeightHolder",
    "consolidate",
    "drain",
    "group_weight_mib",
    "pack",
    "waste_by_device",
    "weight_copies",
]
