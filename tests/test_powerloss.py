"""R2/R3: simulated power loss. A process kill keeps the page cache; a power cut does not. Here
the bytes of every segment file are recorded at each flush (every byte there was fdatasynced) and
crash images are built between two flush points: the synced prefix of each file plus a random
part of what was appended after it, with pages dropped (zeroed) or torn, and files created after
the last directory fsync possibly missing. Recovery must then show the state of the last flush
plus a prefix of the requests that followed it (request atomicity), never garbage and never EIO.

lsfs only: this builds crash images from VOL/segments alone. The image backend's power-loss
states (its change log, image.raw and the mover's syncs, recorded call by call with the same
drop/tear/lose-file rules) are tests/test_crash_states.py's image variant.
"""

import os
import random
import shutil

import pytest

from engine import volume
from engine.volume import Volume

SIZE = 1 << 20
BS = 4096
PAGE = 4096


def _workload(path, rnd, n_flushes):
    """Run a random workload; return [(files_at_flush, durable_bytes, requests_after)]."""
    v = Volume.open(path)
    model = bytearray(SIZE)
    points = []
    segdir = path / "segments"

    def files():
        return {f.name: f.read_bytes() for f in sorted(segdir.iterdir())}

    v.flush()
    current = (files(), bytes(model), [])
    for _ in range(n_flushes):
        for _ in range(rnd.randrange(1, 6)):
            off = rnd.randrange(0, SIZE - 1)
            n = min(rnd.choice([rnd.randrange(1, 3 * BS), BS, 64 * 1024, 200 * 1024]), SIZE - off)
            op = rnd.random()
            if op < 0.75:
                data = os.urandom(n)
                v.write(data, off)
            else:
                data = bytes(n)
                v.zero(n, off)
            model[off:off + n] = data
            current[2].append((off, data))
        v.flush()
        points.append(current)
        current = (files(), bytes(model), [])
    v.abandon()
    # each point's "after" files: what may have reached the disk before the next flush
    return [(points[i][0], points[i + 1][0] if i + 1 < len(points) else current[0],
             points[i][1], points[i][2]) for i in range(len(points))]


def _crash_image(dst, meta_src, synced, later, rnd):
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "segments").mkdir(parents=True)
    shutil.copy(meta_src / "volume.json", dst / "volume.json")
    for name, data in later.items():
        base = synced.get(name)
        if base is None and rnd.random() < 0.3:
            continue  # created after the last directory fsync: the file is lost
        keep = len(base) if base is not None else 0
        tail = bytearray(data[keep:])
        cut = rnd.randrange(0, len(tail) + 1)
        del tail[cut:]  # torn: the end never arrived
        for p in range(0, len(tail), PAGE):  # reordered writeback: some pages never arrived
            if rnd.random() < 0.15:
                tail[p:p + PAGE] = bytes(len(tail[p:p + PAGE]))
        (dst / "segments" / name).write_bytes(data[:keep] + bytes(tail))


def _check_states(tmp_path, seed, n_flushes, variants):
    rnd = random.Random(seed)
    src = tmp_path / "src"
    volume.create(src, SIZE, segment_size=1 << 20)
    points = _workload(src, rnd, n_flushes)
    states = violations = 0
    for synced, later, durable, requests in points:
        candidates = [durable]
        state = bytearray(durable)
        for off, data in requests:
            state[off:off + len(data)] = data
            candidates.append(bytes(state))
        for _ in range(variants):
            img = tmp_path / "img"
            _crash_image(img, src, synced, later, rnd)
            with Volume.open(img) as v:
                got = v.read(SIZE, 0)  # raises on EIO: that would be a violation too
            states += 1
            if got not in candidates:
                violations += 1
    return states, violations


def test_power_loss_between_flushes_recovers_durable_state_plus_a_prefix(tmp_path):
    states, violations = _check_states(tmp_path, seed=1, n_flushes=30, variants=10)
    assert states == 300
    assert violations == 0


@pytest.mark.slow
def test_two_thousand_power_loss_states(tmp_path):
    states, violations = _check_states(tmp_path, seed=2, n_flushes=50, variants=40)
    print(f"R2/R3: {states} crash states, {violations} violations")
    assert states >= 2000 and violations == 0
