"""The scheduler's TOML file: a valid file reads as the issue's example says; every problem is
reported with its key path, one `blockrep: error:` line each, through the real CLI."""

from __future__ import annotations

import json

import pytest
from conftest import run_blockrep

from engine.schedule import config as C
from engine.schedule.calendar import parse_iso

EXAMPLE = """
metrics = "127.0.0.1:9813"
max_transfers = 3
[[volume]]
path = "{vol}"
every = "1h"
start = "2026-03-15T21:53:00"
keep_local = 3
keep_daily = 7
freeze = "/mnt/vol1"
pre = ["echo pre"]
  [[volume.target]]
  uri = "nbds://alice@dr:10809/?tls-psk-file=/etc/blockrep/psk"
  keep_remote = 7
  keep_remote_weekly = 4
  window = "20:00-06:00"
  rate = "10M"
  [[volume.target]]
  uri = "nbd+unix:///?socket=/run/dr2.sock"
  ship = "all"
"""


@pytest.fixture
def vol(tmp_path):
    v = tmp_path / "vol1"
    run_blockrep("create", v, "--size", "16M", check=True)
    return v


def test_the_issue_example_reads_as_written(vol):
    cfg = C.parse(EXAMPLE.format(vol=vol))
    assert cfg.metrics == ("127.0.0.1", 9813) and cfg.max_transfers == 3
    (job,) = cfg.volumes
    assert job.path == vol and job.every == 3600 and job.keep_local == 3
    assert job.start.isoformat() == "2026-03-15T21:53:00"
    assert job.gfs == {"daily": 7} and job.freeze == ("/mnt/vol1",) and job.pre == ("echo pre",)
    a, b = job.targets
    assert a.keep_remote == 7 and a.gfs == {"weekly": 4} and str(a.window) == "20:00-06:00"
    assert a.rate == 10 << 20 and a.ship == "newest"
    assert b.window is None and b.rate is None and b.ship == "all" and b.keep_remote is None


BAD = """
metrics = "nowhere"
max_transfer = 2
[[volume]]
path = "{missing}"
every = "sometimes"
keep_local = 0
keep_daly = 3
  [[volume.target]]
  uri = "http://dr/"
  window = "25:00-06:00"
  rate = "fast"
  keep_remote = -1
  ship = "some"
  [[volume.target]]
  window = "20:00-06:00"
[[volume]]
path = "{vol}"
every = "1h"
[[volume]]
path = "{vol}"
every = "2h"
"""

EXPECTED = ["metrics", "max_transfer", "volume[0].path", "volume[0].every", "volume[0].keep_local",
            "volume[0].keep_daly", "volume[0].target[0].uri", "volume[0].target[0].window",
            "volume[0].target[0].rate", "volume[0].target[0].keep_remote", "volume[0].target[0].ship",
            "volume[0].target[1].uri", "volume[2].path"]


def test_every_error_is_named_by_its_key_path(vol, tmp_path):
    with pytest.raises(C.ConfigError) as e:
        C.parse(BAD.format(vol=vol, missing=tmp_path / "nothing"))
    keys = [line.split(":", 1)[0] for line in e.value.errors]
    assert sorted(keys) == sorted(EXPECTED), e.value.errors


def test_check_prints_one_error_line_per_problem_and_exits_1(vol, tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(BAD.format(vol=vol, missing=tmp_path / "nothing"))
    r = run_blockrep("schedule", "check", f)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == len(EXPECTED)
    assert all(line.startswith(f"blockrep: error: {f}: ") for line in lines)
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("text, needle", [
    ("[[volume]\n", "not valid TOML"),
    ("", "no [[volume]]"),
    ("volume = 3\n", "must be an array of tables"),
    ('retry_min = "2h"\nretry_max = "1h"\n[[volume]]\npath = "{vol}"\nevery = "1m"\n', "retry_min"),
    ('[[volume]]\npath = "{vol}"\nevery = "99999999999999999999d"\n', "from 1s to 366d"),
    ('[[volume]]\npath = "{vol}"\nevery = "1h"\nstart = "0001-01-01T00:00:00"\n', "from 1970 to 9000"),
    ('[[volume]]\npath = "{vol}"\nevery = "1h"\nstart = "9999-12-31T23:59:59"\n', "from 1970 to 9000"),
])
def test_malformed_files(vol, tmp_path, text, needle):
    f = tmp_path / "c.toml"
    f.write_text(text.format(vol=vol))
    r = run_blockrep("schedule", "check", f)
    assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr


def test_toml_date_times_and_integer_seconds_are_accepted(vol):
    cfg = C.parse(f'[[volume]]\npath = "{vol}"\nevery = 5400\nstart = 2026-03-15T21:53:00\n')
    assert cfg.volumes[0].every == 5400 and cfg.volumes[0].start.isoformat() == "2026-03-15T21:53:00"


def test_unreadable_file_is_one_line(tmp_path):
    r = run_blockrep("schedule", "check", tmp_path / "none.toml")
    assert r.returncode == 1 and r.stderr.count("blockrep: error:") == 1


def test_check_json_gives_five_next_runs_and_says_which_dr_retention_applies(vol, tmp_path):
    f = tmp_path / "ok.toml"
    f.write_text(f'[[volume]]\npath = "{vol}"\nevery = "90m"\nstart = "2026-01-01T00:10:00"\n'
                 f'[[volume.target]]\nuri = "nbd+unix:///?socket={tmp_path}/none.sock"\n')
    r = run_blockrep("schedule", "check", f, "--json", check=True)
    out = json.loads(r.stdout)
    (v,) = out["volumes"]
    runs = [parse_iso(x) for x in v["next_runs"]]
    assert len(runs) == 5 and all((b - a).total_seconds() == 5400 for a, b in zip(runs, runs[1:], strict=False))
    assert "unreachable" in v["targets"][0]["dr_retention"]
    text = run_blockrep("schedule", "check", f, check=True).stdout
    assert text.count("next run") == 5


def test_rates_by_time_of_day(vol):
    import datetime as dt
    cfg = C.parse(f'[[volume]]\npath = "{vol}"\nevery = "1h"\n[[volume.target]]\nuri = "nbd://dr/"\nrate = "10M"\n'
                  '[[volume.target.rates]]\nwindow = "08:00-18:00"\nrate = "1M"\n'
                  '[[volume.target.rates]]\nwindow = "07:00-09:00"\nrate = "2M"\n')
    t = cfg.volumes[0].targets[0]
    day = dt.datetime(2026, 5, 4)
    assert t.rate_at(day.replace(hour=8, minute=30).astimezone()) == 1 << 20  # the first open one wins
    assert t.rate_at(day.replace(hour=7, minute=30).astimezone()) == 2 << 20
    assert t.rate_at(day.replace(hour=20).astimezone()) == 10 << 20
    with pytest.raises(C.ConfigError) as e:
        C.parse(f'[[volume]]\npath = "{vol}"\nevery = "1h"\n[[volume.target]]\nuri = "nbd://dr/"\n'
                '[[volume.target.rates]]\nwindow = "8-18"\nrate = "0"\nspeed = 1\n')
    where = "volume[0].target[0].rates[0]"
    assert sorted(x.split(":")[0] for x in e.value.errors) == [f"{where}.rate", f"{where}.speed", f"{where}.window"]
