"""BankResidency: the device keeps the recently used banks within a byte budget, the rest wait on the host."""

from __future__ import annotations

import pytest
import torch

from model.memory_bank import MemoryBank
from service.core.bank_residency import BankResidency, default_budget_bytes


def _bank(seed: int, rows: int = 8) -> MemoryBank:  # 2 stages x 8 rows x 4 dims x 4 bytes = 256 bytes
    return MemoryBank(torch.randn(2, rows, 4, generator=torch.Generator().manual_seed(seed)), shots=1)


def test_least_recently_used_banks_leave_first_within_the_budget() -> None:
    res = BankResidency(torch.device("cpu"), budget_bytes=2 * 256)
    a, b, c = _bank(0), _bank(1), _bank(2)
    got = res.resolve([a, None, b, a])
    assert got[1] is None and got[0] is got[3] and torch.equal(got[0].features, a.features)
    assert res.stats().resident_banks == 2 and res.stats().loads == 2
    res.resolve([a])  # a is now the most recent: c pushes b out, not a
    res.resolve([c])
    st = res.stats()
    assert (st.resident_banks, st.resident_bytes, st.loads, st.evictions) == (2, 512, 3, 1)
    res.resolve([a])  # still resident: no load
    assert res.stats().loads == 3
    res.resolve([b])  # comes back from the host; c (least recent) leaves
    assert (res.stats().loads, res.stats().evictions) == (4, 2)
    assert torch.equal(res.resolve([b])[0].features, b.features)


def test_one_batch_is_served_whole_even_over_the_budget() -> None:
    res = BankResidency(torch.device("cpu"), budget_bytes=256)
    banks = [_bank(i) for i in range(3)]
    got = res.resolve(banks)
    assert all(torch.equal(g.features, b.features) for g, b in zip(got, banks, strict=True))
    assert res.stats().resident_bytes == 3 * 256 and res.stats().evictions == 0  # none of them may leave now
    res.resolve([banks[0]])  # the next batch needs one: the others go
    assert (res.stats().resident_banks, res.stats().evictions) == (1, 2)


def test_admit_forget_and_no_budget() -> None:
    res = BankResidency(torch.device("cpu"))
    assert res.stats().budget_bytes is None and default_budget_bytes(torch.device("cpu")) is None
    host, dev = _bank(0), _bank(0)
    res.admit(host, dev)
    assert res.resolve([host])[0] is dev and res.stats().loads == 0  # admitted copies are not loaded again
    res.forget(_bank(0))  # an unknown bank: nothing happens
    assert res.stats().resident_banks == 1
    res.forget(host)
    assert res.stats().resident_bytes == 0
    for i in range(50):
        res.resolve([_bank(i)])
    assert res.stats().evictions == 0 and res.stats().resident_banks == 50
    with pytest.raises(ValueError):
        BankResidency(torch.device("cpu"), budget_bytes=-1)


def test_host_copies_are_on_the_cpu_and_keep_their_dtype() -> None:
    res = BankResidency(torch.device("cpu"))
    bank = MemoryBank(torch.randn(2, 8, 4, dtype=torch.bfloat16), shots=2)
    host = res.to_host(bank)
    assert host.features.device.type == "cpu" and host.features.dtype == torch.bfloat16 and host.shots == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: pinned host memory and device copies")
def test_cuda_banks_are_pinned_on_the_host_and_copied_to_the_device() -> None:
    dev = torch.device("cuda")
    res = BankResidency(dev, budget_bytes=256)
    host = res.to_host(_bank(0))
    assert host.features.is_pinned()
    got = res.resolve([host])[0]
    assert got.features.device.type == "cuda" and torch.equal(got.features.cpu(), host.features)
    assert default_budget_bytes(dev) == int(torch.cuda.get_device_properties(dev).total_memory * 0.4)


def test_host_bytes_count_what_page_locked_memory_really_holds() -> None:
    """On a GPU host banks are pinned, in power-of-two blocks: sowa_bank_bytes reports the blocks, not the sizes."""
    bank = MemoryBank(torch.zeros(4, 3 * 100, 1000, dtype=torch.bfloat16), 3)  # 2.4 MB of features
    assert BankResidency(torch.device("cuda")).host_bytes(bank) == 4 * 2**20  # no CUDA needed to count
    assert BankResidency(torch.device("cpu")).host_bytes(bank) == bank.nbytes == 2_400_000
    BankResidency(torch.device("cpu")).release_host_cache()  # nothing pinned on a CPU host: a no-op
