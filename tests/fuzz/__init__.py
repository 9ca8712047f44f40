"""Decoder fuzzing (RELIABILITY R16, issue 8 point 5).

Every decoder of something blockrep reads from disk or a socket has a *target* in targets.py:
a function of one byte string that decodes a mutation plan from it, applies it, runs the real
decoder and checks the oracle (no crash, no hang, bounded memory, only BlockrepError subclasses
with a message, and for damaged segments: every read is the data written or EIO). The same
targets run in two tiers:

- CI (tests/test_fuzz_decoders.py, part of `make test`): hypothesis, a few hundred examples per
  target; the targets that reach C run in a worker subprocess (worker.py) so that a segfault or
  a hang is caught and its input saved.
- on demand (`make fuzz DURATION=…`, run.py): atheris (libFuzzer) per target, in-process: libFuzzer
  itself catches crashes, timeouts and RSS overruns and writes the input as an artifact.

Findings are saved under tests/fuzz_corpus/findings/ (git-ignored by name: commit only the ones
turned into regression tests).
"""
