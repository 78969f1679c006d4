"""The cluster-node install line (install-node.sh) is what docs/cluster.md and the README say, and CI runs it.

Running the install itself downloads packages, so it is a CI step (`make node-install`, called by .ci/run:
a fresh venv from the script, then an array-job shuffle and `verify --full` through it), not a test here;
this test keeps the docs, the script, the Makefile and CI from drifting apart and checks the script's own
failure on bad use.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "install-node.sh"


def script_steps() -> list[str]:
    """The install commands of the script: the lines that create the venv and run pip."""
    return [ln.strip() for ln in SCRIPT.read_text().splitlines()
            if ln.startswith(("python3 -m venv", '"$VENV/bin/python" -m pip'))]


def test_docs_show_the_scripts_install_steps():
    steps = script_steps()
    assert steps == ['python3 -m venv "$VENV"', '"$VENV/bin/python" -m pip install --upgrade pip',
                     '"$VENV/bin/python" -m pip install "$SRC[$EXTRAS]"']
    cluster = (ROOT / "docs" / "cluster.md").read_text()
    block = re.search(r"which runs, in a new virtual environment VENV:\n\n```sh\n(.*?)```", cluster, re.S)
    assert block is not None and block.group(1).strip().splitlines() == steps
    assert "sh install-node.sh" in cluster and "sh install-node.sh" in (ROOT / "README.md").read_text()
    assert "EXTRAS=${2:-s3,torch,ray}" in SCRIPT.read_text() and "defaults to `s3,torch,ray`" in cluster


def test_ci_runs_the_node_install():
    make = (ROOT / "Makefile").read_text()
    recipe = make[make.index("\nnode-install:"):]
    assert "sh install-node.sh $(NODE_VENV)" in recipe and "--stage finalize" in recipe and "verify" in recipe
    assert re.search(r"^make node-install$", (ROOT / ".ci" / "run").read_text(), re.M)


def test_script_refuses_a_missing_venv_argument():
    assert subprocess.run(["sh", "-n", str(SCRIPT)]).returncode == 0  # parses
    r = subprocess.run(["sh", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode != 0 and "usage: sh install-node.sh VENV [EXTRAS]" in r.stderr
