"""The adversarial sweep's driver (scripts/adversarial_sweep.py) runs; its quick cases all fail clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tiny_assets import REPO

SCRIPT = REPO / "scripts" / "adversarial_sweep.py"


def test_quick_sweep_has_no_tracebacks_silent_results_or_hangs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    table = dict(line.rsplit(maxsplit=1) for line in done.stdout.splitlines()[-7:])
    assert done.returncode == 0, done.stdout + done.stderr
    assert int(table["clear"]) >= 4
    for kind in ("traceback", "silent", "hang", "data lost", "failed"):
        assert table[kind.ljust(10).rstrip()] == "0", done.stdout
