"""R5: hypothesis stateful test of the engine against a bytearray model.

Operations: write / zero / trim (any alignment), flush, FUA, reads, snapshot create / delete /
read / diff, the collector, clean restarts, and crashes (vol_abandon: what SIGKILL leaves).
Run for both backends: the image backend (docs/IMAGE.md) adds the mover (v.move), and after each
clean restart its image.raw alone must equal the model (a close drains the change log).
Snapshots never change; a diff covers every block whose content differs between two snapshots
and nothing that was not touched between them. After a crash every block must hold
its durable value or the value of a later, not yet durable write to it (request atomicity:
each unflushed request is wholly present or wholly absent, checked per request below).
"""

import os
import shutil
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine import volume
from engine.volume import Volume

SIZE = 2 << 20  # small volume, 1 MiB segments: rotation and collection happen often
BS = 4096

EXAMPLES = int(os.environ.get("BLOCKREP_MODEL_EXAMPLES", "60"))
IMAGE_EXAMPLES = int(os.environ.get("BLOCKREP_MODEL_IMAGE_EXAMPLES", "30"))
STEPS = int(os.environ.get("BLOCKREP_MODEL_STEPS", "60"))

offsets = st.integers(0, SIZE - 1)
lengths = st.one_of(st.integers(1, 3 * BS), st.sampled_from([BS, 2 * BS, 64 * 1024]),
                    st.integers(1, 300 * 1024))


class EngineModel(RuleBasedStateMachine):
    BACKEND = "lsfs"

    @initialize(compress=st.booleans())
    def setup(self, compress):
        self.dir = tempfile.mkdtemp(prefix="blockrep-model-")
        self.path = os.path.join(self.dir, "v")
        image = {"backend": "image", "journal": os.path.join(self.dir, "journal")} if self.BACKEND == "image" else {}
        volume.create(self.path, SIZE, segment_size=1 << 20, compress="zstd" if compress else "none", **image)
        self.v = Volume.open(self.path)
        self.model = bytearray(SIZE)   # what reads must return now
        self.durable = bytearray(SIZE)  # what must survive a crash
        self.pending = []               # requests since the last flush: (offset, bytes-after)
        self.n = 0
        self.snaps = {}                 # name -> (frozen bytes, epoch index)
        self.touched = [set()]          # blocks touched in each epoch (between snapshots)

    def teardown(self):
        if getattr(self, "v", None) is not None and not self.v.closed:
            self.v.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _apply(self, offset, data, fua):
        self.model[offset:offset + len(data)] = data
        self.touched[-1].update(range(offset // BS, (offset + len(data) - 1) // BS + 1))
        if fua:
            # FUA makes this request durable (and, in this engine, every earlier one)
            self._flushed()
        else:
            self.pending.append((offset, bytes(data)))

    def _flushed(self):
        self.durable[:] = self.model
        self.pending.clear()

    @rule(offset=offsets, length=lengths, fua=st.booleans(), pattern=st.integers(0, 255),
          rand=st.booleans())
    def write(self, offset, length, fua, pattern, rand):
        length = min(length, SIZE - offset)
        data = os.urandom(length) if rand else bytes([pattern]) * length
        self.v.write(data, offset, fua=fua)
        self._apply(offset, data, fua)

    @rule(offset=offsets, length=lengths, fua=st.booleans())
    def zero(self, offset, length, fua):
        length = min(length, SIZE - offset)
        self.v.zero(length, offset, fua=fua)
        self._apply(offset, bytes(length), fua)

    @rule(offset=offsets, length=lengths)
    def trim(self, offset, length):
        length = min(length, SIZE - offset)
        self.v.trim(length, offset)
        a, b = -(-offset // BS) * BS, (offset + length) // BS * BS
        if a < b:  # whole blocks read as zero afterwards; partial blocks are untouched
            self._apply(a, bytes(b - a), False)

    @rule()
    def flush(self):
        self.v.flush()
        self._flushed()

    @rule(offset=offsets, length=lengths)
    def read(self, offset, length):
        length = min(length, SIZE - offset)
        assert self.v.read(length, offset) == self.model[offset:offset + length]

    @rule()
    def snapshot_create(self):
        self.n += 1
        name = f"s{self.n}"
        self.v.snapshot_create(name)
        self._flushed()  # a snapshot flushes: everything before it is durable
        self.snaps[name] = (bytes(self.model), len(self.touched))
        self.touched.append(set())

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def snapshot_delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.v.snapshot_delete(name)
        del self.snaps[name]

    @precondition(lambda self: self.snaps)
    @rule(data=st.data(), offset=offsets, length=lengths)
    def snapshot_read(self, data, offset, length):
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        length = min(length, SIZE - offset)
        sid = self.v.snapshot(name)["id"]
        assert self.v.snapshot_read(sid, length, offset) == self.snaps[name][0][offset:offset + length]

    @precondition(lambda self: len(self.snaps) >= 2)
    @rule(data=st.data())
    def diff(self, data):
        a, b = sorted(data.draw(st.lists(st.sampled_from(sorted(self.snaps)), min_size=2, max_size=2,
                                          unique=True)), key=lambda n: self.snaps[n][1])
        (fa, ea), (fb, eb) = self.snaps[a], self.snaps[b]
        got = set()
        for off, length in self.v.diff(a, b):
            got.update(range(off // BS, (off + length) // BS))
        changed = {i for i in range(SIZE // BS) if fa[i * BS:(i + 1) * BS] != fb[i * BS:(i + 1) * BS]}
        touched = set().union(*self.touched[ea:eb])
        assert changed <= got, f"diff {a}..{b} misses changed blocks {sorted(changed - got)[:8]}"
        assert got <= touched, f"diff {a}..{b} names untouched blocks {sorted(got - touched)[:8]}"

    @rule()
    def collect(self):
        self.v.collect(ratio=1.0)

    @rule()
    def checkpoint(self):
        self.v.checkpoint()

    @precondition(lambda self: self.BACKEND == "image")
    @rule(max_bytes=st.sampled_from([BS, 64 * 1024, 4 << 20]))
    def move(self, max_bytes):
        assert self.v.move(max_bytes=max_bytes) >= 0

    @rule()
    def restart(self):
        self.v.close()  # a clean close flushes: everything becomes durable
        self._flushed()
        if self.BACKEND == "image":  # ... and drains the change log into the image
            with open(os.path.join(self.path, "image.raw"), "rb") as f:
                assert f.read() == self.model, "image.raw after a clean close differs from the volume"
        self.v = Volume.open(self.path)
        self._check_snapshots()

    def _check_snapshots(self):
        assert [s["name"] for s in self.v.snapshots()] == sorted(self.snaps, key=lambda n: self.snaps[n][1])
        for name, (frozen, _) in self.snaps.items():
            assert self.v.snapshot_read(self.v.snapshot(name)["id"], SIZE, 0) == frozen

    @rule()
    def crash(self):
        self.v.abandon()
        self.v = Volume.open(self.path)
        got = self.v.read(SIZE, 0)
        # Replay the pending requests in order: the recovered state must equal the durable
        # state plus some prefix of them (the log is ordered; a request is all or nothing).
        state = bytearray(self.durable)
        candidates = [bytes(state)]
        for off, data in self.pending:
            state[off:off + len(data)] = data
            candidates.append(bytes(state))
        assert got in candidates, "recovered state is not durable + a prefix of later requests"
        self.model[:] = got
        self._flushed()
        self._check_snapshots()

    @invariant()
    def extents_match_model_holes(self):
        if getattr(self, "v", None) is None:
            return
        for off, length, typ in self.v.extents(SIZE, 0):
            if typ == 3:  # a hole must read as zeroes
                assert self.model[off:off + length] == bytes(length)


TestEngineModel = EngineModel.TestCase
TestEngineModel.settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


class ImageEngineModel(EngineModel):
    BACKEND = "image"


TestEngineModelImage = ImageEngineModel.TestCase
TestEngineModelImage.settings = settings(max_examples=IMAGE_EXAMPLES, stateful_step_count=STEPS, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.slow
class TestEngineModelFull(EngineModel.TestCase):
    """The RELIABILITY.md R5 figure: 500 examples x 100 steps."""

    settings = settings(max_examples=500, stateful_step_count=100, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])
