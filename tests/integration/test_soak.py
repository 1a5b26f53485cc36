"""A short run of benchmarks/soak.py in CI: 4x more specs than rows, cut-off streams, stop strings,
n=2, hot-loads and bad requests against the real server; no engine death, no 5xx, no mismatch."""

import importlib.util

import pytest

from .procs import REPO

pytestmark = pytest.mark.slow


def test_short_soak(tmp_path):
    spec = importlib.util.spec_from_file_location("soak", REPO / "benchmarks" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    stats = soak.main(["--seconds", "40", "--concurrency", "12", "--out", str(tmp_path / "soak.json")])
    assert stats["engine_deaths"] == 0 and stats["server_errors"] == 0, stats
    assert stats["mismatch_count"] == 0, stats["mismatches"][:3]
    assert not stats["unexpected_rejections"], stats["unexpected_rejections"][:3]  # only the bad corpus is a 4xx
    assert stats["completed"] >= 20 and stats["disconnected"] >= 3 and stats["rejected"], stats
    assert stats["hot_loads"] >= 1, stats
