"""One edge type's neighbour draws in one hop of ``TorchNeighborSampler``, in steps whose
sizes the sampler reads from the device and hands in as host ints (on CUDA each read is a
host sync; the sampler batches them: ``scalable_rec.train.sampler``).

How a node's neighbours are drawn (``k`` the fanout, ``d`` the node's degree): with
``d <= DRAW_FROM * k`` every allowed candidate gets a random 32-bit key and one sort by
(node, key) orders them, the first ``k`` kept (all when ``k`` is -1); a hub
(``d > DRAW_FROM * k``) takes ``2k`` draws with replacement and keeps the first ``k``
distinct allowed ones, and a hub with fewer goes through the sort, after the other nodes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.typing import EdgeType

DRAW_FROM = 4  # a node with more than DRAW_FROM × fanout neighbours is drawn from, not sorted


class EdgeDraws:
    """One edge type's draws in one hop, in steps that ``TorchNeighborSampler._hop`` runs in
    order, handing in the sizes it read as host ints: ``gather`` (given ``first_sizes``) →
    ``filtered`` → ``draw`` → ``outcome`` → ``finish``.

    Args:
        et: The edge type.
        frontier: Its destination nodes to draw for.
        k: The hop's fanout (-1: every neighbour).
        colptr: The edge type's CSC column pointers.
        generator: The batch's generator (draws in call order: a batch repeats).
        allowed: ``(which, pos) → bool mask`` of candidates that are not targets, or ``None``.
    """

    def __init__(
        self, et: EdgeType, frontier: Tensor, k: int, colptr: Tensor, generator: torch.Generator, allowed
    ) -> None:
        self.et, self.frontier, self.k, self.generator, self.allowed = et, frontier, k, generator, allowed
        self.device = frontier.device
        self.start = colptr[frontier]
        self.deg = colptr[frontier + 1] - self.start
        self.hub = hubs_of(self.deg, k)

    def gather(self, num_hubs: int, total: int, kept: int) -> None:
        """Every candidate of the non-hub nodes, and which are allowed (not a target)."""
        self.num_hubs = num_hubs
        self.nonhub = where_true(~self.hub, self.frontier.numel() - num_hubs)
        self.hubs = where_true(self.hub, num_hubs)
        self.nonhub_cands = Candidates(self, self.nonhub, total, 0)
        self.nonhub_allowed, self.nonhub_kept = total, kept  # with targets excluded: read after filtered()

    def filtered(self) -> list[Tensor]:
        return self.nonhub_cands.sizes() if self.allowed is not None else []

    def draw(self) -> None:
        """``2k`` draws with replacement per hub; the first ``k`` distinct allowed ones in
        draw order are taken where there are ``k`` of them."""
        if not self.num_hubs:
            return
        k, hubs = self.k, self.hubs
        d = self.deg[hubs]
        u = torch.rand((hubs.numel(), 2 * k), generator=self.generator, device=self.device, dtype=torch.float64)
        pos = self.start[hubs][:, None] + torch.minimum((u * d[:, None]).long(), d[:, None] - 1)
        sorted_pos, order = torch.sort(pos, dim=1, stable=True)
        first_sorted = torch.ones_like(sorted_pos, dtype=torch.bool)
        first_sorted[:, 1:] = sorted_pos[:, 1:] != sorted_pos[:, :-1]
        ok = torch.empty_like(first_sorted).scatter_(1, order, first_sorted)  # first draw of its position
        if self.allowed is not None:
            ok &= self.allowed(hubs[:, None].expand_as(pos), pos)
        rank = ok.cumsum(1)
        self.done = rank[:, -1] >= k
        self.take = ok & (rank <= k) & self.done[:, None]
        self.hub_pos, self.hub_deg = pos, d

    def outcome(self) -> list[Tensor]:
        """Hubs whose draws fell short, and their candidates (nothing without hubs)."""
        if not self.num_hubs:
            return []
        missed = ~self.done
        return [missed.sum(), self.hub_deg.masked_fill(self.done, 0).sum()]

    def finish(self, num_missed: int = 0, missed_total: int = 0) -> tuple[Tensor, Tensor]:
        """``(which, pos)``: the sorted nodes' kept candidates, then the hubs' draws."""
        k, parts = self.k, [self.nonhub_cands]
        which_h = pos_h = torch.empty(0, dtype=torch.long, device=self.device)
        if self.num_hubs:
            taken = where_true(self.take, k * (self.num_hubs - num_missed))
            which_h, pos_h = self.hubs[taken // (2 * k)], self.hub_pos.flatten()[taken]
            if num_missed:
                missed = self.hubs[where_true(~self.done, num_missed)]
                parts.append(Candidates(self, missed, missed_total, self.nonhub.numel()))
        if len(parts) > 1 and self.allowed is not None:
            # sync point (rare): hubs missed with targets excluded, their allowed candidates
            allowed_b, kept_b = read_sizes(parts[1].sizes())
        elif len(parts) > 1:
            allowed_b, kept_b = missed_total, k * num_missed  # a hub has more than k neighbours
        else:
            allowed_b = kept_b = 0
        seg, pos, count = parts[0].keep(self.nonhub_allowed)
        if len(parts) > 1:
            seg_b, pos_b, count_b = parts[1].keep(allowed_b)
            seg, pos, count = torch.cat([seg, seg_b]), torch.cat([pos, pos_b]), torch.cat([count, count_b])
        nodes = torch.cat([self.nonhub, missed]) if len(parts) > 1 else self.nonhub
        total = seg.numel()
        if k >= 0 and total:
            keys = torch.randint(0, 1 << 32, (total,), generator=self.generator, device=self.device)
            order = torch.sort((seg << 32) | keys, stable=True).indices
            seg, pos = seg[order], pos[order]
            rank = torch.arange(total, device=self.device) - (count.cumsum(0) - count)[seg]
            kept = where_true(rank < k, self.nonhub_kept + kept_b)
            seg, pos = seg[kept], pos[kept]
        return torch.cat([nodes[seg], which_h]), torch.cat([pos, pos_h])


class Candidates:
    """Every CSC position of ``nodes`` (indices into the frontier), node by node: ``seg``
    (the node's index into ``nodes``, plus ``base``), ``pos``, and with targets excluded
    which are allowed and how many per node. ``total``: the nodes' degree sum."""

    def __init__(self, draws: EdgeDraws, nodes: Tensor, total: int, base: int) -> None:
        device, k = draws.device, draws.k
        d = draws.deg[nodes]
        seg = torch.repeat_interleave(torch.arange(nodes.numel(), device=device), d, output_size=total)
        first = d.cumsum(0) - d
        self.seg = seg + base
        self.pos = draws.start[nodes][seg] + torch.arange(total, device=device) - first[seg]
        self.ok, self.count, self.k = None, d, k
        if draws.allowed is not None:
            self.ok = draws.allowed(nodes[seg], self.pos)
            running = torch.zeros(total + 1, dtype=torch.long, device=device)
            running[1:] = self.ok.cumsum(0)
            self.count = running[first + d] - running[first]

    def sizes(self) -> list[Tensor]:
        """Allowed candidates and how many of them are kept."""
        kept = self.count.clamp(max=self.k) if self.k >= 0 else self.count
        return [self.count.sum(), kept.sum()]

    def keep(self, allowed: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(seg, pos, count)`` of the allowed candidates (``allowed`` of them)."""
        if self.ok is None:
            return self.seg, self.pos, self.count
        i = where_true(self.ok, allowed)
        return self.seg[i], self.pos[i], self.count


def first_sizes(deg: Tensor, k: int) -> list[Tensor]:
    """A hop's first sizes for nodes of degrees ``deg`` at fanout ``k``: hubs, non-hub
    candidates, and (with nothing excluded) how many of those are kept."""
    hub = hubs_of(deg, k)
    d = deg.masked_fill(hub, 0)
    kept = d.sum() if k < 0 else d.clamp(max=k).sum()
    return [hub.sum(), d.sum(), kept]


def hubs_of(deg: Tensor, k: int) -> Tensor:
    """Which nodes of degrees ``deg`` are drawn from at fanout ``k`` rather than sorted."""
    return deg > DRAW_FROM * k if k >= 0 else torch.zeros_like(deg, dtype=torch.bool)


def read_sizes(values: list[Tensor]) -> list[int]:
    """Host ints of device scalars, in one read (one sync on CUDA; none for no values)."""
    return torch.stack(values).tolist() if values else []


def where_true(mask: Tensor, count: int) -> Tensor:
    """Flat indices of ``mask``'s true entries, ``count`` of them, read beforehand: unlike a
    boolean index or ``nonzero``, ``nonzero_static`` does not read the size off the device."""
    return torch.nonzero_static(mask.flatten(), size=count).flatten()
