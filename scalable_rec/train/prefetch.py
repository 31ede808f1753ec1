"""Batches built on a side CUDA stream, so that their copies overlap the training step.

The loop queues step ``i`` on the compute stream without waiting for it (the step has no
host sync). When it asks for batch ``i + 1``, the host→device copy of that batch and its
device-side build (``feed.BatchBuilder``: feature and rating gathers, target exclusion),
or, with the torch sampler on the device, the sampling itself, are issued on a side
stream, which runs them while the device still computes step ``i``. A host sync among
them (target exclusion's boolean masks, the sampler's per-hop sizes) waits for the side
stream alone. The compute stream then waits for the side stream (``wait_stream``) before
step ``i + 1``. Every tensor of the batch is marked as used by the compute stream
(``record_stream``), so the caching allocator does not hand its memory to the side stream
again before the step that reads it has run.

A batch is fetched from the loader when the loop asks for it, as without the prefetcher:
the loader's own workers read ahead on the host, and the loop's random streams, stops and
resumes are unchanged. On the CPU it is a pass-through.
"""

from __future__ import annotations

import torch

_END = object()


def batch_tensors(batch) -> list[torch.Tensor]:
    """The tensors a ``HeteroData`` batch holds."""
    return [v for store in batch.stores for v in store.values() if isinstance(v, torch.Tensor)]


class DevicePrefetcher:
    """Iterates ``feed`` (``feed.Feed``: a loader and its ``build``) with every build on a
    side stream of ``device`` (CUDA); on another device it iterates the feed itself.

    Args:
        feed: The batches' loader and the build that puts one on the device.
        device: The training device.
    """

    def __init__(self, feed, device: torch.device) -> None:
        self.feed, self.device = feed, device

    def __len__(self) -> int:
        return len(self.feed)

    def __iter__(self):
        if self.device.type != "cuda":
            yield from self.feed
            return
        compute = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        # What the side stream reads from the device (resident features, the torch sampler's
        # graph and id maps) was put there on the compute stream.
        side.wait_stream(compute)
        items = iter(self.feed.loader)
        while True:
            with torch.cuda.stream(side):
                # The torch sampler samples on the device inside next(): on the side stream
                # its per-hop syncs wait for its own kernels, not for the step queued before.
                item = next(items, _END)
                if item is _END:
                    return
                batch = self.feed.build(item)
            compute.wait_stream(side)
            for t in batch_tensors(batch):
                if t.is_cuda:
                    t.record_stream(compute)
            yield batch
