"""What following other replicas costs an idle directory-store replica: N classes written by one store, another
following them (`ClassRegistry.follow`, the real sync loop) for S seconds with nothing changing.

    python3 scripts/idle_sync_cost.py --classes 2000 --seconds 20

Prints the loop's CPU time per wall second, one idle look (`changes()` with the change marker unmoved), and the
full rescan and the sweep in CPU ms, each of which runs once a minute. docs/service.md quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.calibration import Calibration
from model.inference import ClassMemory
from model.memory_bank import MemoryBank
from service.core.registry import ClassRegistry
from service.core.store import ClassRecord, DirectoryStore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp())
    writer = DirectoryStore(root)
    writer.recover()
    memory = ClassMemory(MemoryBank(torch.zeros(1, 2, 3), 1),
                         Calibration(map_mean=1.0, map_std=0.5, text_mean=0.2, threshold=0.6, shots=1))
    shot = {hashlib.sha256(b"x").hexdigest(): b"x"}
    for i in range(args.classes):
        writer.write(ClassRecord(f"c{i:05d}", tuple(shot), memory, None, 1.0, 1.0, "fp"), shot)
    follower = DirectoryStore(root)  # another replica on the same directory
    follower.recover()
    follower.changes()
    t = time.process_time()
    follower.changes()
    look_ms = (time.process_time() - t) * 1e3
    rescanning = DirectoryStore(root, rescan_s=0.0)  # every look a full rescan: what the minute's one costs
    rescanning.changes()
    t = time.process_time()
    rescanning.changes()
    rescan_ms = (time.process_time() - t) * 1e3
    t = time.process_time()
    follower.sweep()
    sweep_ms = (time.process_time() - t) * 1e3
    registry = ClassRegistry(follower, None, 32)  # type: ignore[arg-type]  # following needs no engine when idle

    async def follow() -> float:
        task = asyncio.create_task(registry.follow(1.0))
        t0, c0 = time.monotonic(), time.process_time()
        await asyncio.sleep(args.seconds)
        share = (time.process_time() - c0) / (time.monotonic() - t0)
        task.cancel()
        return share

    share = asyncio.run(follow())
    print(f"{args.classes} classes: the idle sync loop takes {100 * share:.3f}% of a core; an idle look "
          f"{look_ms:.2f} ms CPU; the full rescan {rescan_ms:.2f} ms and the sweep {sweep_ms:.2f} ms CPU, once a "
          f"minute each: {100 * (rescan_ms + sweep_ms) / 60e3:.3f}% more")


if __name__ == "__main__":
    main()
