"""The pieces between HTTP workers and the engine process, alone: frames, shared-memory slots, the wire format."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
import torch

from service.core.engine import ImageResult
from service.core.errors import ClassNotFoundError, QueueFullError, SowaError
from service.workers.protocol import Cancel, Predict, Reply, parse, read_frame, to_frame
from service.workers.slots import SharedCounter, SlotSegment
from service.workers.wire import error_from_wire, error_to_wire, results_from_wire, results_to_wire


def test_frames_round_trip_through_a_stream() -> None:
    async def go() -> list:
        reader = asyncio.StreamReader()
        reader.feed_data(to_frame(Predict(7, 2, 3, "widget", 12.5, False)))
        reader.feed_data(to_frame(Reply(7, {"x": [1, 2]}), b"\x00\x01payload"))
        reader.feed_data(to_frame(Cancel(9)))
        reader.feed_eof()
        frames = [await read_frame(reader) for _ in range(3)]
        with pytest.raises(asyncio.IncompleteReadError):
            await read_frame(reader)
        return frames

    predict, reply, cancel = asyncio.run(go())
    assert parse(predict) == Predict(7, 2, 3, "widget", 12.5, False)
    assert parse(reply) == Reply(7, {"x": [1, 2]}) and reply.payload == b"\x00\x01payload"
    assert parse(cancel) == Cancel(9)


def test_slot_runs_are_contiguous_and_given_back() -> None:
    seg = SlotSegment(8, 4)
    try:
        assert seg.reserve(3) == 0 and seg.reserve(4) == 3
        assert seg.reserve(2) is None and seg.free_slots == 1  # one free slot left, no run of two
        seg.release(0, 3)
        assert seg.reserve(2) == 0 and seg.reserve(2) is None and seg.reserve(1) == 2
        assert seg.reserve(0) is None and seg.reserve(9) is None
    finally:
        seg.close()


def test_another_process_sees_the_slots_and_the_counter() -> None:
    seg, counter = SlotSegment(4, 8), SharedCounter()
    try:
        seg.array(1, 2)[:] = np.arange(2 * 3 * 8 * 8, dtype=np.uint8).reshape(2, 3, 8, 8)
        counter.set(41)
        code = ("import sys; from service.workers.slots import SlotSegment, SharedCounter;"
                f"s = SlotSegment(4, 8, name='{seg.name}'); c = SharedCounter('{counter.name}');"
                "print(int(s.view(1, 2).sum()), c.value); s.view(0, 1)[:] = 9; s.close(); c.close()")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.split() == [str(int(np.arange(384, dtype=np.uint8).astype(int).sum())), "41"]
        assert int(seg.view(0, 1).max()) == 9  # and writes come back: one memory
    finally:
        seg.close()
        counter.close()


def test_results_carry_only_the_maps_sent() -> None:
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    results = [ImageResult(a, 0.1, 0.7, 0.6, 0.8, True, 2.0, 15.0),
               ImageResult(None, 0.2, 0.3, 0.6, 0.2, False, 2.0, 0.5)]
    rows, payload = results_to_wire(results, need_maps=False)
    assert len(payload) == a.nbytes  # the second map (max 0.5 <= pixel threshold 2.0) holds no region: not sent
    back = results_from_wire(rows, payload, 4)
    assert np.array_equal(back[0].anomaly_map, a) and back[1].anomaly_map is None
    assert [(r.score, r.is_anomalous, r.map_max) for r in back] == [(0.7, True, 15.0), (0.3, False, 0.5)]


def test_errors_keep_their_class_status_and_headers() -> None:
    e = error_from_wire(error_to_wire(QueueFullError("full", headers={"Retry-After": "2"})))
    assert type(e) is QueueFullError and e.status == 429 and e.headers == {"Retry-After": "2"}
    assert type(error_from_wire(error_to_wire(ClassNotFoundError("no")))) is ClassNotFoundError
    odd = error_from_wire({"code": "teapot", "status": 418, "message": "short and stout", "headers": None})
    assert isinstance(odd, SowaError) and (odd.status, odd.code, odd.message) == (418, "teapot", "short and stout")


def test_one_admission_rule_for_the_batcher_and_the_workers() -> None:
    """A worker reads the engine's queue depth from shared memory and applies the batcher's own rule (`admit`),
    so both answer a full queue alike: the same 429 and Retry-After. (The real processes are in test_workers.py:
    a full queue answers 429 before decoding through either worker.)"""
    from service.core.batcher import DynamicBatcher, WorkItem, admit

    admit(6, 2, max_queue=8, max_wait_s=0.005, max_batch_size=4)  # 6 + 2 fits
    with pytest.raises(QueueFullError) as full:
        admit(6, 3, max_queue=8, max_wait_s=0.005, max_batch_size=4)
    assert full.value.headers == {"Retry-After": "1"}
    with pytest.raises(QueueFullError) as deep:  # a long queue asks for a longer wait: 2 + 0.05 * 400 / 4 = 7 s
        admit(400, 1, max_queue=400, max_wait_s=2.0, max_batch_size=4)
    assert deep.value.headers == {"Retry-After": "7"}

    async def run(_: object) -> None: ...

    async def queue_400() -> tuple[QueueFullError, QueueFullError]:
        # 400 images submitted (the loop not started, so they stay queued): what a worker reads is what it told
        depths: list[int] = []
        batcher = DynamicBatcher(run, max_batch_size=4, max_wait_ms=2000, max_queue=400,  # type: ignore[arg-type]
                                 on_depth=depths.append)
        for _ in range(4):
            batcher.submit(WorkItem(torch.zeros(100, 3, 1, 1, dtype=torch.uint8), [None] * 100, deadline=1e12))
        assert batcher.queued_images == 400 and depths[-1] == 400
        with pytest.raises(QueueFullError) as checked:
            batcher.check_room(1)
        with pytest.raises(QueueFullError) as submitted:
            batcher.submit(WorkItem(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), [None], deadline=1e12))
        assert batcher.queued_images == 400  # the refused item was not queued
        return checked.value, submitted.value

    checked, submitted = asyncio.run(queue_400())
    for same in (checked, submitted):  # the batcher's answer is the rule's
        assert same.headers == deep.value.headers and same.message == deep.value.message


def test_result_rows_are_the_score_columns_by_name() -> None:
    from model.inference import ScoreColumns

    r = ImageResult(None, 0.1, 0.7, 0.6, 0.8, True, 2.0, 15.0)
    rows, payload = results_to_wire([r], need_maps=False)
    assert list(rows[0]) == [*ScoreColumns._fields, "pixel_threshold", "has_map"] and payload == b""
    assert results_from_wire(rows, payload, 4) == [r]


def test_a_payload_that_does_not_match_its_rows_is_a_service_error() -> None:
    a = np.zeros((4, 4), np.float32)
    rows, payload = results_to_wire([ImageResult(a, 0.1, 0.7, 0.6, 0.8, True, 2.0, 15.0)], need_maps=True)
    for wrong in (b"", payload[:-4], payload + payload):
        with pytest.raises(SowaError) as caught:
            results_from_wire(rows, wrong, 4)
        assert caught.value.status == 500


def test_every_error_class_comes_back_as_itself() -> None:
    """Found in errors.BY_CODE, not among the subclasses this process happened to import."""
    from service.core.errors import BY_CODE, ResultNotFoundError, ShotNotFoundError

    assert {ResultNotFoundError, ShotNotFoundError} <= set(BY_CODE.values())
    for cls in BY_CODE.values():
        e = error_from_wire(error_to_wire(cls("m")))
        assert type(e) is cls and (e.status, e.code, e.message) == (cls.status, cls.code, "m")
