"""The C engine under the sanitizers (issue 8): csrc/tests/stress.c runs writers, readers,
flushes, snapshot create/delete/read/diff, checkpoints, the collector and close/reopen at once,
round after round, built with ASan+UBSan (memory errors, leaks, undefined behaviour) and with TSan
(data races). Any sanitizer report, model mismatch or engine error fails the test.

Also: the engine's own tests that feed it damaged files (recovery, corruption) run against an
ASan+UBSan build of the cffi module, so the decoders are checked on hostile input too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine._native_build import SOURCES

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
UNITS = ["csrc/tests/stress.c", *(f"csrc/{n}" for n in SOURCES)]
REPORTS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "WARNING: ThreadSanitizer", "runtime error:")


def _build(tmp_path: Path, sanitize: str) -> Path:
    out = tmp_path / f"stress-{sanitize.split(',')[0]}"
    cmd = ["gcc", "-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}",
           "-fno-sanitize-recover=undefined", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
           "-Werror", "-Icsrc", "-o", str(out), *UNITS, "-lzstd", "-lpthread"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def _run(binary: Path, workdir: Path, rounds: int, ops: int, *extra: str, env=None) -> str:
    workdir.mkdir()
    r = subprocess.run([str(binary), str(workdir), str(rounds), str(ops), *extra], capture_output=True,
                       text=True, timeout=600, env={**os.environ, **(env or {})})
    found = [m for m in REPORTS if m in r.stderr]
    assert r.returncode == 0 and not found, f"exit {r.returncode}, {found}:\n{r.stderr[-6000:]}"
    return r.stdout


@pytest.mark.parametrize("compress", ["", "compress", "image"])
def test_concurrency_stress_is_clean_under_asan_and_ubsan(tmp_path, compress):
    b = _build(tmp_path, "address,undefined")
    rounds, ops = (3, 800) if compress == "image" else (8, 3000)  # the image mover costs more per op
    out = _run(b, tmp_path / "vol", rounds, ops, *([compress] if compress else []),
               env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert "ok" in out
    print(out.strip())


@pytest.mark.parametrize("mode", ["", "image"])
def test_concurrency_stress_is_clean_under_tsan(tmp_path, mode):
    b = _build(tmp_path, "thread")
    rounds, ops = (2, 400) if mode else (3, 2000)
    out = _run(b, tmp_path / "vol", rounds, ops, *([mode] if mode else []),
               env={"TSAN_OPTIONS": "halt_on_error=1 second_deadlock_stack=1"})
    assert "ok" in out
    print(out.strip())


def _asan_runtime() -> str | None:
    r = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = r.stdout.strip()
    return path if r.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


def test_the_engine_tests_on_damaged_files_are_clean_under_asan(tmp_path):
    """test_recovery.py (torn tails, bit flips, foreign segments, corrupt checkpoints), the
    integrity and I/O-fault tests and the decoder fuzzers' CI tier against an ASan+UBSan build of
    engine._native, loaded with the ASan runtime preloaded into the interpreter."""
    lib = _asan_runtime()
    assert lib, "gcc's libasan.so is missing (apt libasan8 comes with gcc)"
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "engine", tree / "engine", ignore=shutil.ignore_patterns("_native*.so", "__pycache__"))
    shutil.copytree(CSRC, tree / "csrc")
    shutil.copytree(ROOT / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    r = subprocess.run([sys.executable, "-m", "engine._native_build"], cwd=tree, capture_output=True, text=True,
                       env={**os.environ, "BLOCKREP_SANITIZE": "address,undefined"})
    assert r.returncode == 0, r.stderr[-4000:]
    env = {**os.environ, "LD_PRELOAD": lib, "PYTHONPATH": str(tree),
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:allocator_may_return_null=1:hard_rss_limit_mb=3072",
           "UBSAN_OPTIONS": "print_stacktrace=1", "BLOCKREP_FUZZ_MEM_MB": "0"}
    # -s: a sanitizer report is printed as the process dies, and pytest's capture would eat it
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-x",
                        "tests/test_recovery.py", "tests/test_engine_integrity.py", "tests/test_engine.py",
                        "tests/test_io_faults.py", "tests/test_fuzz_decoders.py", "-m", "not slow"],
                       cwd=tree, env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    found = [m for m in REPORTS if m in out]
    assert r.returncode == 0 and not found, f"exit {r.returncode}, {found}:\n{out[-6000:]}"
