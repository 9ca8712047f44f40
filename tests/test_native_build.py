"""The cffi declarations (engine/_native_build.py CDEF) against the C headers, and the limits
defined once (engine/limits.py) against the C values (issue 11 item 4).

The headers are read with cffi's own C parser after a small preprocessing step (comments and
preprocessor lines out, integer #defines evaluated and substituted), so a function, parameter,
struct field or array size changed in one place and not the other fails here, not at run time."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cffi import FFI

from engine import _native_build, limits

CSRC = Path(__file__).resolve().parent.parent / "csrc"
HEADERS = ("volume.h", "io.h", "crc32c.h")
# declared in the headers for the C units only, never through cffi
C_ONLY = re.compile(r"\bio_\w+\s*\(|^\s*static inline")


def _defines(text: str) -> dict[str, int]:
    out = {}
    for name, expr in re.findall(r"^#define (\w+) (.+?)\s*(?:/\*.*)?$", text, re.M):
        expr = re.sub(r"(?<=[0-9a-fA-F])(?:ull|ul|u)\b", "", expr)
        if re.fullmatch(r"[\s0-9a-fA-Fx()<>|+*-]+", expr):
            out[name] = eval(expr)  # noqa: S307 -- digits and operators only (checked above)
    return out


def _header_decls() -> tuple[dict, dict[str, int]]:
    text = "\n".join((CSRC / h).read_text() for h in HEADERS)
    defines = _defines(text)
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    text = re.sub(r"^[^;{}]*?;", lambda m: "" if C_ONLY.search(m.group(0)) else m.group(0), text, flags=re.M)
    text = "\n".join(line for line in text.splitlines() if not C_ONLY.search(line))
    for name, value in defines.items():
        text = re.sub(rf"\b{name}\b", str(value), text)
    ffi = FFI()
    ffi.cdef(text)
    return ffi._parser._declarations, defines


def _cdef_decls() -> dict:
    ffi = FFI()
    ffi.cdef(_native_build.CDEF)
    return ffi._parser._declarations


def _describe(tp) -> str:
    if hasattr(tp, "fldnames") and tp.fldnames is not None:
        return "; ".join(f"{t.get_c_name()} {n}" for n, t in zip(tp.fldnames, tp.fldtypes, strict=True))
    return tp.get_c_name()


def test_every_public_function_and_struct_matches_the_headers():
    hdr, _ = _header_decls()
    cdef = _cdef_decls()
    wanted = [k for k in hdr if k.split()[0] in ("function", "struct", "typedef")]
    assert wanted, "nothing parsed from the headers"
    missing = [k for k in wanted if k not in cdef]
    assert not missing, f"declared in csrc headers but not in the cffi CDEF: {missing}"
    differ = {k: (_describe(hdr[k][0]), _describe(cdef[k][0])) for k in wanted
              if _describe(hdr[k][0]) != _describe(cdef[k][0])}
    assert not differ, f"header vs CDEF: {differ}"


def test_the_cdef_declares_nothing_the_headers_do_not():
    hdr, defines = _header_decls()
    extra = []
    for k in _cdef_decls():
        kind, name = k.split(None, 1)
        if kind == "macro":
            if name not in defines:
                extra.append(k)
        elif kind in ("function", "struct", "typedef") and k not in hdr and name != "_io_recorder":
            extra.append(k)  # _io_recorder: the extern "Python" callback, cffi's own
    assert not extra, f"in the CDEF but in no header: {extra}"


def test_the_limits_are_defined_once():
    """engine/limits.py's values equal the C #defines, both as the headers say and as compiled."""
    _, defines = _header_decls()
    for py_name, c_name in limits.C_NAMES.items():
        assert defines[c_name] == getattr(limits, py_name), (py_name, c_name)
    native = pytest.importorskip("engine._native")
    for py_name, c_name in limits.C_NAMES.items():
        assert getattr(native.lib, c_name) == getattr(limits, py_name), (py_name, c_name)


def test_the_engine_module_agrees_with_the_limits():
    from engine import volume

    assert volume.BLOCK == limits.BLOCK and volume.MAX_SIZE == limits.MAX_SIZE
    assert volume.NO_SNAPSHOT == limits.NO_SNAPSHOT


def test_the_sources_list_every_c_unit():
    """A .c file under csrc/ (the stress test aside) that the build leaves out would go unbuilt."""
    units = {str(p.relative_to(CSRC)) for p in CSRC.rglob("*.c") if "tests" not in p.parts}
    assert units == set(_native_build.SOURCES)
