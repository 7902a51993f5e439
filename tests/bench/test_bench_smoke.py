"""Smoke test of the end-to-end benchmark harness (``make bench``), quick mode, direct and
haproxy cases only.  It checks that the harness runs, that the result document is well formed
with positive figures, and that nothing of the run is left behind.  No timing thresholds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshlab.build import is_lab_netns, list_netns, netns_pids
from tests.bench import report
from tests.bench.harness import REPO

pytestmark = [pytest.mark.privileged, pytest.mark.slow]


def test_quick_bench_direct_and_haproxy(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.run", "--quick", "--cases", "direct,haproxy",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    assert report.check_result_document(doc) == []
    assert doc["mode"] == "quick"
    assert sorted(doc["cases"]) == ["direct", "haproxy"]
    for name, case in doc["cases"].items():
        assert case["ok"], f"{name}: {case['error']}"
        assert {m.key for m in report.METRICS} <= set(case["metrics"])
        assert case["detail"]["cps"]["connections"] > 0
        assert case["detail"]["rr"]["round_trips"] == doc["params"]["rr_count"]
    # haproxy's processes were measured (pinned, one per side).
    assert set(doc["cases"]["haproxy"]["proxy_cpu_percent"]["tput1"]) == {"client", "server"}
    assert set(doc["ratios"]["haproxy"]["vs_direct"]) == {m.key for m in report.METRICS}
    # The table was printed with the haproxy/direct ratio column.
    assert "haproxy/direct" in proc.stdout

    # Nothing of the run is left: namespaces (and so every process inside them) are gone.
    prefix = doc["prefix"]
    leftovers = [n for n in list_netns() if is_lab_netns(n, prefix)]
    assert leftovers == []
    assert netns_pids(leftovers) == []
