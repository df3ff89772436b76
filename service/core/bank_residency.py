"""Which class banks are on the device: a byte budget, least-recently-used banks offloaded to host memory.

Every registered class keeps its bank in host memory (pinned on CUDA, so copies to the device are asynchronous
DMA). A batch asks for the device copies of its classes' banks; those not resident are copied in, and the banks
used longest ago are dropped from the device until the resident ones fit the budget again. At K = 4 a ViT-L bank
weighs 14 MB in bf16, so 1,000 classes need 14 GB: a budget keeps the hot classes on the GPU and the rest a
PCIe copy away (about 1 ms per bank at 16 GB/s) instead of running out of memory.

The banks of one batch are always served, even when together they exceed the budget; the excess is dropped as
soon as a later batch needs room. On the CPU host and device memory are the same: nothing is copied and the
budget only counts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.memory_bank import MemoryBank

__all__ = ["BankResidency", "ResidencyStats", "default_budget_bytes"]


def default_budget_bytes(device: torch.device, fraction: float = 0.4) -> int | None:
    """`fraction` of a GPU's memory for banks (weights and activations need the rest); no limit on the CPU."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory * fraction)


@dataclass(frozen=True)
class ResidencyStats:
    resident_banks: int
    resident_bytes: int
    budget_bytes: int | None
    loads: int  # host -> device copies since start
    evictions: int  # banks dropped from the device since start


class BankResidency:
    """Device copies of host banks, least recently used first out. Thread-safe: the engine thread resolves,
    registry threads forget."""

    def __init__(self, device: torch.device, budget_bytes: int | None = None) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 or None, got {budget_bytes}")
        self.device, self.budget = torch.device(device), budget_bytes
        # id(host bank) -> (host bank, device bank); holding the host bank keeps its id from being reused
        self._resident: OrderedDict[int, tuple[MemoryBank, MemoryBank]] = OrderedDict()
        self._bytes = 0
        self._loads = self._evictions = 0
        self._lock = threading.Lock()

    def to_host(self, bank: MemoryBank) -> MemoryBank:
        """The copy a class keeps for its life: host memory, page-locked when the device is a GPU."""
        features = bank.features.detach().to("cpu")
        if self.device.type == "cuda":
            features = features.pin_memory()
        return MemoryBank(features, bank.shots)

    def host_bytes(self, bank: MemoryBank) -> int:
        """Host memory a class's copy really holds: CUDA's caching host allocator hands out page-locked memory in
        power-of-two blocks, so a 14 MB bank holds 16 MiB (on the CPU, its size)."""
        n = bank.nbytes
        return 1 << (n - 1).bit_length() if self.device.type == "cuda" and n > 0 else n

    def release_host_cache(self) -> None:
        """Give page-locked blocks that no bank uses any more back to the system: the allocator keeps freed
        blocks for reuse otherwise, so replaced and deleted classes would stay held. The registry calls it when
        a class goes; a block still used by a request in flight goes at the next call."""
        if self.device.type == "cuda":
            torch._C._host_emptyCache()

    def admit(self, host: MemoryBank, device_bank: MemoryBank) -> None:
        """Record a device copy that already exists (a class just fitted on the device), as most recent."""
        with self._lock:
            if id(host) not in self._resident:
                self._resident[id(host)] = (host, device_bank)
                self._bytes += device_bank.nbytes
            self._resident.move_to_end(id(host))
            self._shrink(keep=(id(host),))

    def resolve(self, banks: Sequence[MemoryBank | None]) -> list[MemoryBank | None]:
        """Device copies of the host banks of one batch, in order (None stays None)."""
        wanted = {id(b): b for b in banks if b is not None}
        with self._lock:
            for key, host in wanted.items():
                if key in self._resident:
                    self._resident.move_to_end(key)
                    continue
                device_bank = MemoryBank(host.features.to(self.device, non_blocking=True), host.shots)
                self._resident[key] = (host, device_bank)
                self._bytes += device_bank.nbytes
                self._loads += 1
            self._shrink(keep=tuple(wanted))
            return [None if b is None else self._resident[id(b)][1] for b in banks]

    def forget(self, host: MemoryBank) -> None:
        """Drop a bank whose class was replaced or deleted."""
        with self._lock:
            item = self._resident.get(id(host))
            if item is not None and item[0] is host:
                del self._resident[id(host)]
                self._bytes -= item[1].nbytes

    def stats(self) -> ResidencyStats:
        with self._lock:
            return ResidencyStats(len(self._resident), self._bytes, self.budget, self._loads, self._evictions)

    def _shrink(self, keep: tuple[int, ...]) -> None:
        """Evict least recently used banks, never those of the batch at hand, until the budget holds."""
        if self.budget is None:
            return
        for key in list(self._resident):
            if self._bytes <= self.budget:
                break
            if key in keep:
                continue
            _, device_bank = self._resident.pop(key)
            self._bytes -= device_bank.nbytes
            self._evictions += 1
