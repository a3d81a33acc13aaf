"""One packing run's mutable state and its phases (see the package docstring for the algorithm):
kept placements, spread and chunked new placements, preemption, local improvement, and the result."""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence

from vnpu.api import slices_for_mib
from vnpu.operator.packing.align import device_mapping
from vnpu.operator.packing.cluster import Cluster, Signature, blocking_taints, taint_str
from vnpu.operator.packing.free_index import FreeIndex
from vnpu.operator.packing.inputs import NO_EXECUTE, NO_SCHEDULE, Placement, Spread
from vnpu.operator.packing.outputs import (
    Assignment,
    Dropped,
    PackResult,
    Reason,
    Unplaced,
    WeightHolder,
)

#: Lightest used devices the merge pass of :meth:`Packer.improve` pairs up (at most n·(n-1)/2 tries).
MERGE_CANDIDATES = 12


class Packer:
    """Mutable state of one packing run (see the module docstring for the algorithm)."""

    def __init__(
        self,
        cluster: Cluster,
        share: bool = True,
        current: dict[tuple[int, int], tuple[int, int]] | None = None,
    ) -> None:
        c = self.cluster = cluster
        #: False: the share-blind model, every replica pays its own copy of the weights.
        self.share = share
        # Static data, shared read-only with the other runs of the same pack() call.
        self.nodes, self.demands, self.demand_index = c.nodes, c.demands, c.demand_index
        self.dev_id, self.dev_node, self.dev_cls, self.dev_total = (
            c.dev_id,
            c.dev_node,
            c.dev_cls,
            c.dev_total,
        )
        self.dev_ok_kept, self.dev_ok_new, self.dev_ordinal = c.dev_ok_kept, c.dev_ok_new, c.dev_ordinal
        self.slice_sizes, self.group_mib = c.slice_sizes, c.group_mib
        self.rep_slices, self.w_slices, self.sig = c.rep_slices, c.w_slices, c.sig
        self.node_ok, self.dev_sigs = c.node_ok, c.dev_sigs
        self.sig_of = c.sig_of
        # Capacity: free slices per device and one free-slice index per eligibility signature.
        self.dev_free = list(c.dev_available)
        self.indexes = [
            FreeIndex.build(len(c.slice_sizes), c.max_slices, eligible, self.dev_free, c.dev_cls, c.dev_total)
            for eligible in c.eligible
        ]
        # Share groups present per device (replica counts), and the devices holding each group.
        self.dev_groups: list[dict[str, int]] = [{} for _ in self.dev_id]
        self.group_devices: dict[str, dict[int, None]] = {g: {} for g in self.group_mib}
        # Groups whose weights are on a device already (held outside the plan): never charged there.
        self.dev_loaded = c.dev_loaded
        for o, groups in enumerate(self.dev_loaded):
            for g in groups:
                self.group_devices[g][o] = None
        # Chunk ordering knobs of the randomised variants (see ``perturb``); neutral by default.
        self.jitter = [1.0] * len(self.demands)
        self.balanced = [False] * len(self.demands)
        self.split = [False] * len(self.demands)
        self.rng: random.Random | None = None
        # Placements: (demand, replica) -> (device ordinal, slices, kept); per (demand, node) counts.
        self.placed: dict[tuple[int, int], tuple[int, int, bool]] = {}
        self.model_node_count: list[dict[int, int]] = [{} for _ in self.demands]
        self.missing: list[list[int]] = [[] for _ in self.demands]
        self.unplaced: list[Unplaced] = []
        self.dropped: list[Dropped] = []
        # Where ``current`` had each replica (device, slices): decides ``Assignment.kept`` (shared).
        self.current: dict[tuple[int, int], tuple[int, int]] = current if current is not None else {}
        # Per tenant (Demand.tenant): its kept replicas as (priority, demand, replica), lowest first: the
        # replicas its higher priorities may preempt. Keyed so that one tenant's unplaceable demands
        # never walk every other tenant's replicas (that made each pass, everyone's, seconds longer).
        self.kept_by_tenant: dict[str, list[tuple[int, int, int]]] = {}
        self.node_verdicts: dict[int, tuple[int, tuple[Reason, str] | None]] = {}
        self.on_device: dict[int, list[tuple[int, int]]] = {}  # filled by ``improve``

    def _eligible_nodes(self, di: int) -> list[bool]:
        """Per node: may new replicas of demand ``di`` go there (selector and taints)."""
        return self.node_ok[self.sig_of[di]]

    def demand_index_of(self, di: int) -> FreeIndex:
        """The free-slice index of the devices new replicas of demand ``di`` may use."""
        return self.indexes[self.sig_of[di]]

    # -- primitive moves ------------------------------------------------------------------------

    def _set_free(self, o: int, new: int) -> None:
        old = self.dev_free[o]
        if old != new:
            cls = self.dev_cls[o]
            for sid in self.dev_sigs[o]:
                self.indexes[sid].move(cls, o, old, new)
            self.dev_free[o] = new

    def cost(self, di: int, o: int) -> int:
        """Slices one more replica of demand ``di`` takes on device ``o`` (weights if not there yet)."""
        cls = self.dev_cls[o]
        cost = self.rep_slices[di][cls]
        group = self.demands[di].share_group
        if not self.share or (group not in self.dev_groups[o] and group not in self.dev_loaded[o]):
            cost += self.w_slices[di][cls]
        return cost

    def _holds_weights(self, o: int, group: str) -> bool:
        """Whether device ``o`` has ``group``'s weights: a replica of it placed there, or loaded."""
        return group in self.dev_groups[o] or group in self.dev_loaded[o]

    def may_add(self, di: int, o: int) -> bool:
        """Whether one more replica of demand ``di`` fits device ``o`` (room, and hard spread: none of
        its replicas on that node yet). Eligibility is the caller's: it copies a placement that had it."""
        return self.cost(di, o) <= self.dev_free[o] and not self._hard_spread_holds_node(di, self.dev_node[o])

    def _hard_spread_holds_node(self, di: int, node: int) -> bool:
        """Demand ``di`` spreads hard and already has a replica on ``node``: no other may go there."""
        return self.demands[di].spread == Spread.HARD and self.model_node_count[di].get(node, 0) > 0

    def place(
        self,
        di: int,
        o: int,
        count: int,
        kept: bool = False,
        replicas: Sequence[int] = (),
        update_index: bool = True,
    ) -> None:
        """Put ``count`` replicas of demand ``di`` on device ``o`` (taking indices from ``missing``
        unless ``replicas`` names them). ``update_index=False`` leaves the free-slice indexes to the
        caller (bulk updates)."""
        d = self.demands[di]
        cls = self.dev_cls[o]
        r = self.rep_slices[di][cls]
        groups = self.dev_groups[o]
        cost = r * count if self.share else (r + self.w_slices[di][cls]) * count
        if d.share_group not in groups:
            cost += self.w_slices[di][cls] if self.share and d.share_group not in self.dev_loaded[o] else 0
            groups[d.share_group] = 0
            self.group_devices[d.share_group][o] = None
        groups[d.share_group] += count
        if cost > self.dev_free[o]:
            raise AssertionError(f"bug: over-committing device {self.dev_id[o]}")
        if update_index:
            self._set_free(o, self.dev_free[o] - cost)
        else:
            self.dev_free[o] -= cost
        indices = list(replicas) if replicas else [self.missing[di].pop(0) for _ in range(count)]
        for replica in indices:
            self.placed[(di, replica)] = (o, r, kept)
        counts = self.model_node_count[di]
        node = self.dev_node[o]
        counts[node] = counts.get(node, 0) + count

    def unplace(self, di: int, replica: int) -> int:
        """Remove one placed replica; returns its device. The replica index becomes missing again."""
        o, r, _ = self.placed.pop((di, replica))
        d = self.demands[di]
        groups = self.dev_groups[o]
        groups[d.share_group] -= 1
        w = self.w_slices[di][self.dev_cls[o]]
        freed = r if self.share else r + w
        if groups[d.share_group] == 0:
            del groups[d.share_group]
            if d.share_group not in self.dev_loaded[o]:  # (loaded weights stay, held outside)
                del self.group_devices[d.share_group][o]
                freed += w if self.share else 0
        self._set_free(o, self.dev_free[o] + freed)
        counts = self.model_node_count[di]
        counts[self.dev_node[o]] -= 1
        self.missing[di].append(replica)
        self.missing[di].sort()
        return o

    # -- phase 1: kept placements ----------------------------------------------------------------

    def keep_current(
        self,
        candidates: Sequence[tuple[Placement, int, int]],
        static_drops: Sequence[Dropped],
        offered: Sequence[tuple[Placement, int, int]] = (),
    ) -> None:
        """Commit the running replicas that are still valid (see :meth:`Cluster.keep_candidates`) and
        still fit, highest priority first; then the offered placements that still fit (never in room a
        running replica keeps). The indexes are updated once per device at the end."""
        self.dropped.extend(static_drops)
        before: dict[int, int] = {}
        for p, di, o in candidates:
            node = self.dev_node[o]
            if self._hard_spread_holds_node(di, node):
                reason = f"spreadAcrossNodes=hard: another replica already runs on node {p.node}"
            elif self.cost(di, o) > self.dev_free[o]:
                reason = f"device {p.device} no longer has room for it"
            else:
                before.setdefault(o, self.dev_free[o])
                self.place(di, o, 1, kept=True, replicas=[p.replica], update_index=False)
                self._keep(di, p.replica)
                continue
            self.dropped.append(Dropped(p, reason))
        placed = [0] * len(self.demands)
        for di, _ in self.placed:
            placed[di] += 1
        for p, di, o in offered:
            if placed[di] >= self.demands[di].replicas or self._hard_spread_holds_node(di, self.dev_node[o]):
                continue
            if self.cost(di, o) <= self.dev_free[o]:  # (else it is placed like any new replica)
                before.setdefault(o, self.dev_free[o])
                self.place(di, o, 1, kept=True, replicas=[p.replica], update_index=False)
                self._keep(di, p.replica)
                placed[di] += 1
        for o, old in before.items():
            new, self.dev_free[o] = self.dev_free[o], old
            self._set_free(o, new)

    def _keep(self, di: int, replica: int) -> None:
        d = self.demands[di]
        self.kept_by_tenant.setdefault(d.tenant, []).append((d.priority, di, replica))

    # -- phases 2-4: new placements ---------------------------------------------------------------

    def place_all(self, preempt: bool) -> None:
        taken: list[set[int]] = [set() for _ in self.demands]
        for di, replica in self.placed:
            taken[di].add(replica)
        for di, d in enumerate(self.demands):
            # The lowest free indices, as many as are missing (survivors of a scale-down keep theirs).
            need = d.replicas - len(taken[di])
            free = (r for r in range(d.replicas + len(taken[di])) if r not in taken[di])
            self.missing[di] = [next(free) for _ in range(max(0, need))]
        for kept in self.kept_by_tenant.values():
            kept.sort()
        levels = sorted({d.priority for d in self.demands}, reverse=True)
        for level in levels:
            members = [di for di, d in enumerate(self.demands) if d.priority == level]
            spread = [di for di in members if self.demands[di].spread != Spread.NONE]
            packed = [di for di in members if self.demands[di].spread == Spread.NONE]
            for di in sorted(spread, key=lambda di: (-self._chunk_mib(di, 1), self.demands[di].model)):
                self._place_spread(di, preempt)
            self._place_chunks(packed, preempt)

    def _chunk_mib(self, di: int, k: int) -> int:
        d = self.demands[di]
        return self.group_mib[d.share_group] + k * d.replica_mib

    def _place_spread(self, di: int, preempt: bool) -> None:
        d = self.demands[di]
        idx = self.demand_index_of(di)
        counts = self.model_node_count[di]
        level = 0
        while self.missing[di]:
            o = self._spread_target(di, idx, level)
            if o is not None:
                self.place(di, o, 1)
                continue
            max_count = max(counts.values(), default=0)
            if d.spread == Spread.BEST_EFFORT and level < max_count:
                level += 1  # every node with <= level replicas is full: allow one more per node
                continue
            if preempt and self._preempt(di, max_level=level):
                continue
            self._give_up(di)

    def _spread_target(self, di: int, idx: FreeIndex, level: int) -> int | None:
        """Tightest device on a node with <= ``level`` replicas of this model: one already holding the
        group's weights first, else one with room for weights + replica."""
        counts = self.model_node_count[di]
        best: tuple[int, int] | None = None
        ok = self._eligible_nodes(di)
        for o in self.group_devices[self.demands[di].share_group] if self.share else ():
            if (
                self.dev_ok_new[o]
                and ok[self.dev_node[o]]
                and counts.get(self.dev_node[o], 0) <= level
                and self.rep_slices[di][self.dev_cls[o]] <= self.dev_free[o]
            ):
                key = (self.dev_free[o] - self.rep_slices[di][self.dev_cls[o]], o)
                if best is None or key < best:
                    best = key
        if best is not None:
            return best[1]
        candidates = []
        for cls in range(len(self.slice_sizes)):
            need = self.rep_slices[di][cls] + self.w_slices[di][cls]
            for o in idx.walk(cls, need):
                if counts.get(self.dev_node[o], 0) <= level and (
                    not self.share or not self._holds_weights(o, self.demands[di].share_group)
                ):
                    candidates.append(((self.dev_free[o] - need) * self.slice_sizes[cls], o))
                    break
        return min(candidates)[1] if candidates else None

    def _place_chunks(self, members: list[int], preempt: bool) -> None:
        """Best-fit decreasing by chunk for the non-spread demands of one priority level."""
        heap: list[tuple[float, str, int]] = []
        for di in members:
            if self.missing[di]:
                heap.append((-self._next_chunk(di)[0], self.demands[di].model, di))
        heapq.heapify(heap)
        while heap:
            _, model, di = heapq.heappop(heap)
            if not self.missing[di]:
                continue
            if self._fill_group_devices(di):
                if self.missing[di]:
                    heapq.heappush(heap, (-self._next_chunk(di)[0], model, di))
                continue
            key, k, cls = self._next_chunk(di)
            if k == 0:
                if preempt and self._preempt(di):
                    heapq.heappush(heap, (-self._next_chunk(di)[0], model, di))
                else:
                    self._give_up(di)
                continue
            if heap and key < -heap[0][0]:  # stale key: a bigger chunk of another demand goes first
                heapq.heappush(heap, (-key, model, di))
                continue
            need = self.w_slices[di][cls] + k * self.rep_slices[di][cls]
            o = self.demand_index_of(di).best_fit(cls, need)
            assert o is not None, "bug: chunk sized to the largest free device does not fit"
            self.place(di, o, k)
            if self.missing[di]:
                heapq.heappush(heap, (-self._next_chunk(di)[0], model, di))

    def _fill_group_devices(self, di: int) -> bool:
        """Add replicas of ``di`` to eligible devices already holding its group's weights (each costs
        only its own slices), tightest device first. True if any replica was placed."""
        if not self.share or self.balanced[di] or self.split[di]:
            return False  # (variants that shape a demand's chunks must not have them merged back)
        ok = self._eligible_nodes(di)
        rep = self.rep_slices[di]
        candidates = sorted(
            (self.dev_free[o], o)
            for o in self.group_devices[self.demands[di].share_group]
            if self.dev_ok_new[o] and ok[self.dev_node[o]] and rep[self.dev_cls[o]] <= self.dev_free[o]
        )
        placed = False
        for _, o in candidates:
            if not self.missing[di]:
                break
            r = rep[self.dev_cls[o]]
            k = min(len(self.missing[di]), self.dev_free[o] // r if r else len(self.missing[di]))
            if k:
                self.place(di, o, k)
                placed = True
        return placed

    def _next_chunk(self, di: int) -> tuple[float, int, int]:
        """(ordering key, replicas, slice class) of the next chunk of ``di``: the most replicas the
        emptiest eligible device can take (or, in a ``balanced`` variant, the remaining replicas spread
        evenly over as few devices). The key is the chunk's MiB (times the variant's jitter)."""
        idx = self.demand_index_of(di)
        n = len(self.missing[di]) if self.share else 1  # share-blind: one replica at a time (plain BFD)
        best = (0, 0, 0)
        for cls in range(len(self.slice_sizes)):
            room = idx.max_free(cls) - self.w_slices[di][cls]
            r = self.rep_slices[di][cls]
            if room < 0 or (r and room < r):
                continue
            k = min(n, room // r) if r else n
            if self.balanced[di] and 0 < k < n:
                k = -(-n // -(-n // k))
            elif self.split[di] and k > 1 and self.rng is not None:
                k = self.rng.randint(1, k)
            mib = self._chunk_mib(di, k)
            if (k, mib) > (best[1], best[0]):
                best = (mib, k, cls)
        return best[0] * self.jitter[di], best[1], best[2]

    def perturb(self, rng: random.Random) -> None:
        """Make this run a randomised variant (GRASP-style): jitter the chunk order, balance some
        demands' chunks. Deterministic for a given ``rng`` seed."""
        self.rng = rng
        self.jitter = [rng.uniform(0.7, 1.3) for _ in self.demands]
        self.balanced = [rng.random() < 0.4 for _ in self.demands]
        self.split = [rng.random() < 0.3 for _ in self.demands]

    def _preempt(self, di: int, max_level: int | None = None) -> bool:
        """Evict strictly lower-priority replicas of the same tenant from the one device where that
        frees room for one replica of ``di`` at the least cost; the victims go back to their own
        level's queue. (A priority is the tenant's own to set: across tenants it would be a way to
        evict another's running replicas.)"""
        d = self.demands[di]
        kept = self.kept_by_tenant.get(d.tenant, [])
        if not kept or kept[0][0] >= d.priority:
            return False  # nothing of lower priority runs (lower levels are placed after this one)
        ok = self._eligible_nodes(di)
        victims_by_device: dict[int, list[tuple[int, int, int]]] = {}
        for prio, dj, replica in kept:
            if prio >= d.priority:
                break
            where = self.placed.get((dj, replica))
            if where is not None and self.demands[dj].share_group != d.share_group:
                victims_by_device.setdefault(where[0], []).append((prio, dj, replica))
        best: tuple[tuple[int, int, int, int], list[tuple[int, int, int]]] | None = None
        for o, victims in victims_by_device.items():
            if not (self.dev_ok_new[o] and ok[self.dev_node[o]]):
                continue
            if max_level is not None and self.model_node_count[di].get(self.dev_node[o], 0) > max_level:
                continue  # spread: only nodes with at most ``max_level`` replicas of this model
            need = self.cost(di, o)
            free = self.dev_free[o]
            group_left = dict(self.dev_groups[o])
            chosen = []
            for prio, dj, replica in sorted(victims, key=lambda v: (v[0], -v[2], self.demands[v[1]].model)):
                if free >= need:
                    break
                chosen.append((prio, dj, replica))
                w = self.w_slices[dj][self.dev_cls[o]]
                free += self.placed[(dj, replica)][1] + (0 if self.share else w)
                g = self.demands[dj].share_group
                group_left[g] -= 1
                if group_left[g] == 0 and self.share and g not in self.dev_loaded[o]:
                    free += w
            if free >= need and chosen:
                key = (max(v[0] for v in chosen), len(chosen), free - need, o)
                if best is None or key < best[0]:
                    best = (key, chosen)
        if best is None:
            return False
        o = best[0][3]
        for _, dj, replica in best[1]:
            placement = self._as_placement(dj, replica)
            self.unplace(dj, replica)
            self.dropped.append(Dropped(placement, f"preempted by {d.model} (priority {d.priority})"))
        self.place(di, o, 1)
        return True

    def _as_placement(self, di: int, replica: int) -> Placement:
        o, r, _ = self.placed[(di, replica)]
        return Placement(
            self.demands[di].model, replica, self.nodes[self.dev_node[o]].name, self.dev_id[o], r
        )

    def _give_up(self, di: int) -> None:
        code, reason = self._explain(di)
        d = self.demands[di]
        for replica in self.missing[di]:
            self.unplaced.append(
                Unplaced(
                    d.model,
                    replica,
                    d.share_group,
                    d.priority,
                    code,
                    reason,
                    d.replica_mib,
                    self.group_mib[d.share_group],
                )
            )
        self.missing[di] = []

    def _explain(self, di: int) -> tuple[Reason, str]:
        """Why demand ``di`` does not fit, most specific cause first."""
        d = self.demands[di]
        if not self.nodes:
            return Reason.NO_NODES, "no nodes with vnpu devices in the cluster"
        sid = self.sig_of[di]
        if sid not in self.node_verdicts:
            self.node_verdicts[sid] = self._node_verdict(self.sig[di])
        eligible_nodes, verdict = self.node_verdicts[sid]
        if verdict is not None:
            return verdict
        idx = self.demand_index_of(di)
        # The slice class with the biggest eligible device decides the message.
        cls = max(
            range(len(self.slice_sizes)), key=lambda c: (idx.largest_total[c] * self.slice_sizes[c], -c)
        )
        biggest = idx.largest_total[cls]
        if biggest == 0 and idx.max_free(cls) < 0:
            return Reason.NO_ELIGIBLE_NODE, "no healthy device on the eligible nodes"
        w, r = self.w_slices[di][cls], self.rep_slices[di][cls]
        weights = f" ({r} per replica + {w} for the weights)" if w else ""
        if w + r > biggest:
            return Reason.DEVICE_TOO_SMALL, (
                f"needs {w + r} slices{weights} of {self.slice_sizes[cls]} MiB, "
                f"the largest eligible device has {biggest}"
            )
        if d.spread == Spread.HARD:
            return Reason.SPREAD, (
                f"spreadAcrossNodes=hard: each of the {eligible_nodes} eligible nodes already runs a replica "
                f"or has no room for one ({w + r} slices{weights})"
            )
        return Reason.INSUFFICIENT_MEMORY, (
            f"insufficient memory: needs {w + r} slices{weights}, largest free {max(idx.max_free(cls), 0)}"
        )

    def _node_verdict(self, sig: Signature) -> tuple[int, tuple[Reason, str] | None]:
        """(eligible nodes, the reason when there are none) for one signature, in the scheduler's
        style: ``0/12 nodes are available: 3 didn't match nodeSelector, 9 had untolerated taints``."""
        selector, tolerations = sig
        excluded: dict[str, int] = {}
        taints: set[str] = set()
        eligible = 0
        for node in self.nodes:
            if any(node.labels.get(k) != v for k, v in selector):
                why = "didn't match nodeSelector"
            elif blocking := blocking_taints(node, tolerations, (NO_SCHEDULE, NO_EXECUTE)):
                why = "had untolerated taints"
                taints.update(taint_str(t) for t in blocking)
            elif not node.ready:
                why = "not ready"
            elif not node.schedulable:
                why = "unschedulable (cordoned)"
            elif not any(dev.healthy for dev in node.devices):
                why = "had no healthy device"
            else:
                eligible += 1
                continue
            excluded[why] = excluded.get(why, 0) + 1
        if eligible:
            return eligible, None
        total = len(self.nodes)
        if excluded.get("didn't match nodeSelector") == total:
            return 0, (Reason.NODE_SELECTOR, f"no node matches nodeSelector {dict(selector)}")
        parts = []
        for what, n in sorted(excluded.items()):
            suffix = f" {{{', '.join(sorted(taints))}}}" if what == "had untolerated taints" else ""
            parts.append(f"{n} {what}{suffix}")
        only_taints = set(excluded) <= {"had untolerated taints", "didn't match nodeSelector"}
        code = Reason.TAINTED if only_taints else Reason.NO_ELIGIBLE_NODE
        return 0, (code, f"0/{total} nodes are available: {', '.join(parts)}")

    # -- phase 5: local improvement --------------------------------------------------------------

    def improve(self) -> None:
        """Empty lightly used devices by moving their replicas into the room left on other used
        devices; a device is only touched if it holds new replicas of non-spread demands only (kept
        replicas never move here), and a move is committed only if the whole device empties."""
        self.on_device = {}
        for (di, replica), (o, _, _) in self.placed.items():
            self.on_device.setdefault(o, []).append((di, replica))
        movable = [
            o
            for o, reps in self.on_device.items()
            if all(not self.placed[k][2] and self.demands[k[0]].spread == Spread.NONE for k in reps)
        ]
        movable.sort(
            key=lambda o: ((self.dev_total[o] - self.dev_free[o]) * self.slice_sizes[self.dev_cls[o]], o)
        )
        for o in movable:
            self._try_empty(o)
        self._merge_pairs([o for o in movable if o in self.on_device])

    def _merge_pairs(self, movable: Sequence[int]) -> None:
        """Move the replicas of two lightly used devices together onto one empty device that holds them
        both (a bigger one): best fit onto the tightest device leaves such pairs, which emptying one
        device into the others cannot undo. Only the :data:`MERGE_CANDIDATES` lightest devices are
        paired, so the pass stays cheap at scale."""
        candidates = list(movable[:MERGE_CANDIDATES])
        merged: set[int] = set()
        for i, a in enumerate(candidates):
            for b in candidates[i + 1 :]:
                if a in merged or b in merged or self.dev_cls[a] != self.dev_cls[b]:
                    continue
                moving = sorted(self.on_device[a] + self.on_device[b])
                cls = self.dev_cls[a]
                groups = {self.demands[di].share_group: di for di, _ in moving}
                need = sum(self.rep_slices[di][cls] for di, _ in moving)
                need += sum(self.w_slices[di][cls] for di in groups.values()) if self.share else 0
                if not self.share:
                    need += sum(self.w_slices[di][cls] for di, _ in moving)
                target = self._empty_target(moving, cls, need, (a, b))
                if target is None:
                    continue
                for di, replica in moving:
                    self.unplace(di, replica)
                for di, replica in moving:
                    self.missing[di].remove(replica)
                    self.place(di, target, 1, replicas=[replica])
                self.on_device[target] = moving
                del self.on_device[a], self.on_device[b]
                merged |= {a, b, target}
                break

    def _empty_target(
        self, moving: Sequence[tuple[int, int]], cls: int, need: int, exclude: tuple[int, int]
    ) -> int | None:
        """The tightest empty device of class ``cls`` with ``need`` slices that every replica in
        ``moving`` may use."""
        first = moving[0][0]
        for o in self.demand_index_of(first).walk(cls, need):
            if o in exclude or self.dev_free[o] != self.dev_total[o]:
                continue
            node = self.dev_node[o]
            if all(self._eligible_nodes(di)[node] for di, _ in moving):
                return o
        return None

    def _try_empty(self, o: int) -> bool:
        """Move every replica on device ``o`` to other used devices, if they all fit. The moves are
        planned first against an overlay of what the plan adds, so a failed attempt changes nothing."""
        moving = sorted(self.on_device.get(o, []))
        if not moving:
            return False
        added_slices: dict[int, int] = {}
        added_groups: dict[int, set[str]] = {}
        plan: list[tuple[int, int, int]] = []
        for di, replica in moving:
            target = self._improve_target(di, o, added_slices, added_groups)
            if target is None:
                return False
            group = self.demands[di].share_group
            cost = self.rep_slices[di][self.dev_cls[target]]
            if not self._holds_weights(target, group) and group not in added_groups.get(target, ()):
                cost += self.w_slices[di][self.dev_cls[target]]
            added_slices[target] = added_slices.get(target, 0) + cost
            added_groups.setdefault(target, set()).add(group)
            plan.append((di, replica, target))
        for di, replica in moving:
            self.unplace(di, replica)
        for di, replica, target in plan:
            self.missing[di].remove(replica)
            self.place(di, target, 1, replicas=[replica])
            self.on_device[target].append((di, replica))
        del self.on_device[o]
        return True

    def _improve_target(
        self, di: int, exclude: int, added_slices: dict[int, int], added_groups: dict[int, set[str]]
    ) -> int | None:
        """The tightest other *used* device with room for one replica of ``di``, given what the
        planned moves add: one holding the group's weights first (replica only), else one with room
        for weights + replica."""
        ok = self._eligible_nodes(di)
        group = self.demands[di].share_group
        best: tuple[int, int] | None = None
        holding = list(self.group_devices[group]) + [t for t, gs in added_groups.items() if group in gs]
        for o in holding:
            free = self.dev_free[o] - added_slices.get(o, 0)
            if (
                o != exclude
                and self.dev_ok_new[o]
                and ok[self.dev_node[o]]
                and self.rep_slices[di][self.dev_cls[o]] <= free
            ) and (best is None or (free, o) < best):
                best = (free, o)
        if best is not None:
            return best[1]
        idx = self.demand_index_of(di)
        candidates = []
        for cls in range(len(self.slice_sizes)):
            need = self.rep_slices[di][cls] + self.w_slices[di][cls]
            for o in idx.walk(cls, need):
                if self.dev_free[o] == self.dev_total[o]:  # an empty device: not a target
                    if self.dev_total[o] >= idx.largest_total[cls]:
                        break  # no device has more room than this one: the rest are empty too
                    continue  # a smaller empty one: a bigger used device further on may have room
                free = self.dev_free[o] - added_slices.get(o, 0)
                if o != exclude and o in self.on_device and free >= need:
                    candidates.append(((free - need) * self.slice_sizes[cls], o))
                    break
        return min(candidates)[1] if candidates else None

    # -- output ---------------------------------------------------------------------------------

    def score(self, levels: Sequence[int]) -> tuple[tuple[int, ...], int, int, int]:
        """This run's :func:`_score`, from its state (no result objects built)."""
        per_priority: dict[int, int] = {}
        for u in self.unplaced:
            per_priority[u.priority] = per_priority.get(u.priority, 0) + 1
        devices = set()
        slices = moves = 0
        for (di, replica), (o, r, _) in self.placed.items():
            devices.add(o)
            slices += r if self.share else r + self.w_slices[di][self.dev_cls[o]]
            moves += self.current.get((di, replica)) != (o, r)
        if self.share:
            for o in devices:
                cls = self.dev_cls[o]
                slices += sum(
                    slices_for_mib(self.group_mib[g], self.slice_sizes[cls])
                    for g in self.dev_groups[o]
                    if g not in self.dev_loaded[o]
                )
        return tuple(per_priority.get(level, 0) for level in levels), len(devices), slices, moves

    def result(self) -> PackResult:
        charged: dict[tuple[int, str], tuple[str, int]] = {}
        holder_models: dict[tuple[int, str], set[str]] = {}
        for (di, replica), (o, _, _) in self.placed.items():
            d = self.demands[di]
            key = (o, d.share_group)
            holder_models.setdefault(key, set()).add(d.model)
            if key not in charged or (d.model, replica) < charged[key]:
                charged[key] = (d.model, replica)
        assignments = []
        for (di, replica), (o, r, _) in self.placed.items():
            d = self.demands[di]
            assignments.append(
                Assignment(
                    model=d.model,
                    replica=replica,
                    node=self.nodes[self.dev_node[o]].name,
                    device=self.dev_id[o],
                    slices=r if self.share else r + self.w_slices[di][self.dev_cls[o]],
                    share_group=d.share_group,
                    weight_holder=self.share and charged[(o, d.share_group)] == (d.model, replica),
                    kept=self.current.get((di, replica)) == (o, r),
                )
            )
        assignments.sort(key=lambda a: (a.model, a.replica))
        holders = []
        for (o, group), models in sorted(holder_models.items()):
            slices = slices_for_mib(self.group_mib[group], self.slice_sizes[self.dev_cls[o]])
            if slices and self.share:
                holders.append(
                    WeightHolder(
                        self.nodes[self.dev_node[o]].name,
                        self.dev_id[o],
                        group,
                        slices,
                        tuple(sorted(models)),
                    )
                )
        final = {(a.model, a.replica): a for a in assignments}
        dropped = [
            x
            for x in self.dropped
            if not ((a := final.get((x.placement.model, x.placement.replica))) and a.kept)
        ]
        dropped.sort(
            key=lambda x: (x.placement.model, x.placement.replica, x.placement.node, x.placement.device)
        )
        unplaced = sorted(self.unplaced, key=lambda u: (u.model, u.replica))
        return PackResult(tuple(assignments), tuple(holders), tuple(unplaced), tuple(dropped))

    def aligned_with_current(self) -> Packer:
        """This plan with its devices renamed onto interchangeable ones (see
        :mod:`vnpu.operator.packing.align`) so that as many replicas as possible stay where ``current``
        runs them: a new run of the same cluster, with the same devices used, slices and verdicts."""
        mapping = device_mapping(
            self.cluster,
            ((di, o) for (di, _), (o, _, _) in self.placed.items()),
            ((di, o) for (di, _), (o, _) in self.current.items()),
        )
        out = Packer(self.cluster, self.share, self.current)
        for (di, replica), (o, _, kept) in sorted(self.placed.items()):
            out.place(di, mapping[o], 1, kept=kept, replicas=[replica])
        out.unplaced, out.dropped = list(self.unplaced), list(self.dropped)
        out.kept_by_tenant = {tenant: list(kept) for tenant, kept in self.kept_by_tenant.items()}
        out.missing = [list(m) for m in self.missing]
        return out

    def match_indices(self) -> None:
        """Renumber the new replicas of each demand so that one landing on the device where ``current``
        had replica ``i`` is replica ``i`` (after defragmentation most replicas can then stay)."""
        by_demand: dict[int, list[tuple[int, int]]] = {}
        for (di, replica), (o, _, kept) in self.placed.items():
            if not kept:
                by_demand.setdefault(di, []).append((replica, o))
        for di, entries in by_demand.items():
            slots: dict[int, int] = {}
            for _, o in entries:
                slots[o] = slots.get(o, 0) + 1
            unmatched = []
            new_device: dict[int, int] = {}
            for replica, _ in sorted(entries):
                was = self.current.get((di, replica))
                if was is not None and slots.get(was[0], 0) > 0:
                    slots[was[0]] -= 1
                    new_device[replica] = was[0]
                else:
                    unmatched.append(replica)
            leftover = sorted(o for o, n in slots.items() for _ in range(n))
            new_device.update(zip(unmatched, leftover, strict=True))
            for replica, _ in entries:
                del self.placed[(di, replica)]
            for replica, o in sorted(new_device.items()):
                self.placed[(di, replica)] = (o, self.rep_slices[di][self.dev_cls[o]], False)
