"""Counts host syncs on any device: the operations that, on a CUDA tensor, make the host
wait for the device (a value read, or an output size that depends on device data).

On the CPU nothing waits, but the same operations run, so counting them there counts the
syncs the same code makes on CUDA. Copies between devices are not visible on a CPU-only
machine (none is made where this counts). Used by tests/test_sampler_syncs.py.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Each of these reads device data on the host (CUDA's bincount reads the input's maximum;
# isin's sorting path runs unique).
SYNCING = {
    aten._local_scalar_dense.default: "item/bool/int",
    aten.nonzero.default: "nonzero",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.bincount.default: "bincount",
    aten.masked_select.default: "masked_select",
    aten.isin.Tensor_Tensor: "isin",
    aten.isin.Tensor_Scalar: "isin",
    aten.isin.Scalar_Tensor: "isin",
}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class _Ops(TorchDispatchMode):
    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = SYNCING.get(func)
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            what = "repeat_interleave without output_size"
        elif func in BOOL_INDEXED and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        ):
            what = "boolean-mask index"
        if what:
            self.counts[what] = self.counts.get(what, 0) + 1
        return func(*args, **kwargs)


class _ToList(TorchFunctionMode):  # tolist() never reaches the dispatcher on the CPU
    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.counts["tolist"] = self.counts.get("tolist", 0) + 1
        return func(*args, **(kwargs or {}))


class HostSyncs:
    """``with HostSyncs() as syncs: ...``; then ``syncs.total`` and ``syncs.counts`` (per kind)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._modes = (_ToList(self.counts), _Ops(self.counts))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> HostSyncs:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
