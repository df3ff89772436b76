"""The dynamic batcher on its own, with a plain async run_batch that records what it was given."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from service.core.batcher import DynamicBatcher, WorkItem
from service.core.errors import DeadlineExceededError, NotReadyError, QueueFullError
from service.core.telemetry import Telemetry
from tests.helpers import wait_for_async


class Recorder:
    def __init__(self, delay: float = 0.0, fail_when: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.models: list[object] = []
        self.delay, self.fail_when = delay, fail_when

    async def __call__(self, images: list[torch.Tensor], memories: list, need_maps: list[bool],
                       model: object = None) -> list[float]:
        ids = [int(v) for t in images for v in t[:, 0, 0, 0]]
        self.batches.append(ids)
        self.models.append(model)
        await asyncio.sleep(self.delay)
        if self.fail_when is not None and self.fail_when in ids:
            raise RuntimeError("device fell over")
        return [float(i) for i in ids]


def _item(*ids: int, deadline: float = 60.0, model: object = None) -> WorkItem:
    x = torch.zeros(len(ids), 3, 2, 2)
    x[:, 0, 0, 0] = torch.tensor(ids, dtype=torch.float32)
    return WorkItem(x, [None] * len(ids), deadline=time.monotonic() + deadline, model=model)


def test_requests_started_on_different_models_never_share_a_batch() -> None:
    """A model switch lands between batches: each batch runs on the one model its requests started on."""
    old, new = object(), object()

    async def go() -> Recorder:
        rec = Recorder(delay=0.05)
        b = DynamicBatcher(rec, max_batch_size=8, max_wait_ms=50, max_queue=64)
        b.start()
        items = [b.submit(_item(i, model=old if i < 3 else new)) for i in range(6)]
        assert await asyncio.gather(*(it.future for it in items)) == [[float(i)] for i in range(6)]
        await b.close()
        return rec

    rec = asyncio.run(go())
    assert rec.batches == [[0, 1, 2], [3, 4, 5]]
    assert rec.models == [old, new]


def test_requests_are_batched_up_to_the_limit_and_answered_in_order() -> None:
    async def go() -> Recorder:
        rec = Recorder(delay=0.05)
        b = DynamicBatcher(rec, max_batch_size=4, max_wait_ms=20, max_queue=64, telemetry=Telemetry())
        b.start()
        items = [b.submit(_item(i)) for i in range(10)]
        results = await asyncio.gather(*(it.future for it in items))
        assert results == [[float(i)] for i in range(10)]
        await b.close()
        return rec

    rec = asyncio.run(go())
    assert [len(x) for x in rec.batches] == [4, 4, 2]
    assert sorted(i for x in rec.batches for i in x) == list(range(10))


def test_a_request_never_splits_and_a_big_one_runs_alone() -> None:
    async def go() -> Recorder:
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch_size=4, max_wait_ms=20, max_queue=64)
        b.start()
        items = [b.submit(_item(1, 2, 3)), b.submit(_item(4, 5)), b.submit(_item(6, 7, 8, 9, 10, 11))]
        assert await items[1].future == [4.0, 5.0]
        await asyncio.gather(*(it.future for it in items))
        await b.close()
        return rec

    assert asyncio.run(go()).batches == [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]


def test_failure_stays_in_its_batch() -> None:
    async def go() -> None:
        rec = Recorder(fail_when=2)
        b = DynamicBatcher(rec, max_batch_size=2, max_wait_ms=10, max_queue=64)
        b.start()
        items = [b.submit(_item(i)) for i in range(4)]
        done = await asyncio.gather(*(it.future for it in items), return_exceptions=True)
        assert done[0] == [0.0] and done[1] == [1.0]
        assert isinstance(done[2], RuntimeError) and isinstance(done[3], RuntimeError)
        assert await b.submit(_item(9)).future == [9.0]  # the loop survived
        await b.close()

    asyncio.run(go())


def test_cancelled_and_expired_requests_never_reach_the_device() -> None:
    async def go() -> Recorder:
        rec = Recorder(delay=0.1)
        # one batch in flight: the device is busy with the first, so the others wait in the queue
        b = DynamicBatcher(rec, max_batch_size=1, max_wait_ms=0, max_queue=64, max_in_flight=1)
        b.start()
        first = b.submit(_item(0))
        gone = b.submit(_item(1))
        late = b.submit(_item(2, deadline=0.05))
        gone.future.cancel()  # the client went away while queued
        assert await first.future == [0.0]
        with pytest.raises(DeadlineExceededError):
            await late.future
        assert await b.submit(_item(3)).future == [3.0]
        await b.close()
        return rec

    assert asyncio.run(go()).batches == [[0], [3]]


def test_a_request_cancelled_while_its_batch_fills_is_dropped_at_the_door() -> None:
    async def go() -> Recorder:
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch_size=4, max_wait_ms=200, max_queue=64)
        b.start()
        stays, leaves = b.submit(_item(0)), b.submit(_item(1))
        # both in the forming batch, which waits for more until its window closes
        await wait_for_async(lambda: b.waiting == 0, 5, "both requests taken into the batch", interval=0.001)
        leaves.future.cancel()
        assert await stays.future == [0.0]
        assert b.queued_images == 0  # the dropped one is accounted for too
        await b.close()
        return rec

    assert asyncio.run(go()).batches == [[0]]


def test_full_queue_refuses_with_retry_after_and_close_drains() -> None:
    async def go() -> None:
        rec = Recorder(delay=0.05)
        b = DynamicBatcher(rec, max_batch_size=2, max_wait_ms=0, max_queue=3)
        b.start()
        kept = [b.submit(_item(1, 2)), b.submit(_item(3))]
        with pytest.raises(QueueFullError) as e:
            b.submit(_item(4))
        assert int(e.value.headers["Retry-After"]) >= 1
        closing = asyncio.create_task(b.close())
        await asyncio.sleep(0)
        with pytest.raises(NotReadyError):
            b.submit(_item(5))
        await closing
        assert [it.future.result() for it in kept] == [[1.0, 2.0], [3.0]]  # drained, not dropped
        assert b.queued_images == 0

    asyncio.run(go())


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_queue >= max_batch_size"):
        DynamicBatcher(Recorder(), max_batch_size=8, max_wait_ms=1, max_queue=4)


def test_two_batches_in_flight_and_no_more() -> None:
    """While batch N's results come back, batch N+1 is already launched; a third waits for one of them."""
    class Overlap(Recorder):
        def __init__(self) -> None:
            super().__init__(delay=0.05)
            self.now = self.most = 0

        async def __call__(self, images: list[torch.Tensor], memories: list, need_maps: list[bool],
                           model: object = None) -> list[float]:
            self.now += 1
            self.most = max(self.most, self.now)
            try:
                return await super().__call__(images, memories, need_maps)
            finally:
                self.now -= 1

    async def go() -> Overlap:
        rec = Overlap()
        b = DynamicBatcher(rec, max_batch_size=2, max_wait_ms=0, max_queue=64)
        b.start()
        items = [b.submit(_item(i)) for i in range(12)]
        results = await asyncio.gather(*(it.future for it in items))
        assert results == [[float(i)] for i in range(12)]
        await b.close()
        return rec

    rec = asyncio.run(go())
    assert rec.most == 2 and [len(x) for x in rec.batches] == [2] * 6
