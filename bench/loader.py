"""An MLPerf-Storage-style data loader, run inside a lab VM (standard library only).

Emulated accelerators, as DLIO has them: each one takes a batch of samples (small files)
from its reader and then "computes" for a fixed time (it sleeps). Its reader reads the next
batches ahead, a few at a time, while it computes. Accelerator utilisation is compute time
over run time (from the first batch's arrival: filling the pipeline is a warm-up step, as
in training loops): it stays near 1 while storage keeps up, and falls once it cannot.

    python3 loader.py prepare DIR --samples N --sample-kib K
    python3 loader.py run DIR --accelerators N --batch B --compute-ms C --batches M [--readers R]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PREFETCH = 2  # batches a reader keeps ready, as a DataLoader's prefetch factor
READERS = 4  # threads reading one accelerator's batch at once (DLIO's read_threads)


def utilisation(compute_s: float, batches: int, wall_s: float) -> float:
    """Compute time over run time for one accelerator."""
    if wall_s <= 0:
        raise ValueError("a run takes some time")
    return min(1.0, compute_s * batches / wall_s)


def largest_kept(runs: dict[int, float], threshold: float = 0.9) -> int:
    """The most accelerators kept at or above the threshold, counting up from the fewest
    (a count beyond the first that fell short does not count); 0 if even one fell short."""
    kept = 0
    for n in sorted(runs):
        if runs[n] < threshold:
            break
        kept = n
    return kept


def sample_names(total: int) -> list[str]:
    return [f"{i:06d}.bin" for i in range(total)]


def prepare(data: Path, samples: int, sample_kib: int) -> None:
    data.mkdir(parents=True, exist_ok=True)
    block = os.urandom(sample_kib * 1024)
    for name in sample_names(samples):
        (data / name).write_bytes(block)
    os.sync()


def run(
    data: Path, accelerators: int, batch: int, compute_ms: float, batches: int,
    readers: int = READERS,
) -> float:  # fmt: skip
    """Mean utilisation of the accelerators; each reads its own samples, none twice, with
    `readers` threads per accelerator reading a batch's samples at once."""
    names = sample_names(accelerators * batch * batches)
    missing = [n for n in names[-1:] if not (data / n).exists()]
    if missing:
        raise SystemExit(f"{data} holds too few samples for this run: prepare more")
    compute_s = compute_ms / 1000
    results: list[float] = []
    lock = threading.Lock()

    def read_one(name: str) -> int:
        with open(data / name, "rb", buffering=0) as f:
            return len(f.read())

    def reader(mine: Sequence[str], out: queue.Queue[int]) -> None:
        with ThreadPoolExecutor(max_workers=readers) as pool:
            for b in range(batches):
                out.put(sum(pool.map(read_one, mine[b * batch : (b + 1) * batch])))

    def accelerator(index: int) -> None:
        mine = names[index * batch * batches : (index + 1) * batch * batches]
        ready: queue.Queue[int] = queue.Queue(maxsize=PREFETCH)
        feeder = threading.Thread(target=reader, args=(mine, ready), daemon=True)
        feeder.start()
        ready.get()  # the first batch fills the pipeline: a warm-up step, not counted
        begin = time.monotonic()
        time.sleep(compute_s)
        for _ in range(batches - 1):
            ready.get()
            time.sleep(compute_s)
        wall = time.monotonic() - begin
        with lock:
            results.append(utilisation(compute_s, batches, wall))

    workers = [threading.Thread(target=accelerator, args=(i,)) for i in range(accelerators)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(results) / len(results)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("data", type=Path)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--sample-kib", type=int, required=True)
    r = sub.add_parser("run")
    r.add_argument("data", type=Path)
    r.add_argument("--accelerators", type=int, required=True)
    r.add_argument("--batch", type=int, required=True)
    r.add_argument("--compute-ms", type=float, required=True)
    r.add_argument("--batches", type=int, required=True)
    r.add_argument("--readers", type=int, default=READERS, help="reading threads per accelerator")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.data, args.samples, args.sample_kib)
        return 0
    au = run(args.data, args.accelerators, args.batch, args.compute_ms, args.batches, args.readers)
    print(json.dumps({"accelerators": args.accelerators, "utilisation": au}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
