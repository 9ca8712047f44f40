#!/usr/bin/env bash
# Generate the blockrep(1) man page from the command-line parser (engine/cli.py build_parser), so
# the page always lists every command and option with the help texts `--help` shows.
#   scripts/manpage.sh [OUTPUT]   (default .venv/share/man/man1/blockrep.1; `make man` runs it)
# man-db finds it through PATH (.venv/bin -> .venv/share/man): `man blockrep` once .venv/bin is
# on PATH, `man -l .venv/share/man/man1/blockrep.1` anywhere.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-.venv/share/man/man1/blockrep.1}"
mkdir -p "$(dirname "$OUT")"
VERSION="$(.venv/bin/python -c 'from engine.version import version; print(version())')"
.venv/bin/argparse-manpage --module engine.cli --function build_parser --prog blockrep \
    --project-name blockrep --version "$VERSION" --manual-title "blockrep manual" \
    --description "block volumes over NBD with snapshots and replication" \
    --include scripts/manpage-extra.man --output "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "manpage: wrote $OUT (blockrep $VERSION)" >&2
