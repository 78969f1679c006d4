"""The Python API in a plain script: spawn re-runs the caller's script in every worker process, so a call to
`shuffler.shuffle(..., workers=2)` at the top level of a script without an `if __name__ == "__main__":` guard
would start again in every worker. It fails at once with a message naming the guard (and leaves nothing at
DST); the same script with the guard, or with workers=1, works. The scripts run in subprocesses.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shuffler.shuffling.executor import unguarded_main_line
from writers.synth import SynthConfig, synth

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("guard") / "raw")
    synth(url, SynthConfig(rows=20_000, d_model=16, docs=100, seed=0))
    return url


def run_script(tmp_path: Path, body: str) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "plain.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHUFFLER_NO_PROGRESS": "1"}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    return r, time.perf_counter() - t


def test_unguarded_script_fails_at_once_naming_the_guard(tmp_path, src):
    dst = tmp_path / "out"
    r, _ = run_script(tmp_path, f"""
        import shuffler

        shuffler.shuffle({src!r}, {str(dst)!r}, seed=0, workers=2, map_rows=4000)
        print("done")
    """)
    assert r.returncode != 0 and "done" not in r.stdout
    assert "plain.py, line 4" in r.stderr and 'if __name__ == "__main__":' in r.stderr, r.stderr
    assert "worker process died" not in r.stderr and "out of memory" not in r.stderr
    assert not (dst / "manifest.json").exists()


@pytest.mark.parametrize("guard, workers", [(True, 2), (False, 1)])
def test_guarded_or_single_worker_script_works(tmp_path, src, guard, workers):
    dst = tmp_path / "out"
    call = f"m = shuffler.shuffle({src!r}, {str(dst)!r}, seed=0, workers={workers}, map_rows=4000)\nprint(m.num_rows)"
    body = "import shuffler\n\n" + (f"if __name__ == '__main__':\n{textwrap.indent(call, '    ')}\n" if guard else call)
    r, _ = run_script(tmp_path, body)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["20000"] and (dst / "manifest.json").exists()


def test_guard_detection_on_source():
    tree = ast.parse(textwrap.dedent("""
        import x
        x.go()
        if __name__ == "__main__":
            x.go()
        if "__main__" == __name__:
            with open("f"):
                x.go()
        try:
            x.go()
        finally:
            pass
        if __name__ != "__main__":
            x.go()
    """))
    from shuffler.shuffling import executor

    guarded = {line: executor.under_main_guard(tree.body, line) for line in (3, 5, 8, 10, 14)}
    assert guarded == {3: False, 5: True, 8: True, 10: False, 14: False}
    assert unguarded_main_line() is None  # under pytest (python -m pytest: pytest.__main__ is not re-run)
