"""The example files under examples/: docs/cluster.md includes each verbatim, and the Kubernetes manifest is
valid against the Kubernetes API schema (kubernetes-validate, whose JSON schemas ship in the package, so
nothing is fetched) and its command parses with the real CLI.

A doc includes a file with a marker line right before a fenced block holding the file's exact text:
    <!-- file: examples/slurm/shuffle.sbatch -->
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = re.compile(r"<!-- file: (\S+) -->\n```[a-z]*\n(.*?)```\n", re.S)
MANIFEST = ROOT / "examples" / "k8s" / "shuffle-job.yaml"
# backoffLimitPerIndex is beta (on by default) from Kubernetes 1.29 and GA from 1.33.
VERSIONS = ("1.29", "1.33", "latest")


def includes() -> list[tuple[str, str, str]]:
    """(doc, included path, block text) for every marker in README.md and docs/*.md."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        found += [(doc.name, path, block) for path, block in INCLUDE.findall(text)]
        assert text.count("<!-- file: ") == len(INCLUDE.findall(text)), f"{doc.name}: a marker without its block"
    return found


def test_the_example_files_chain_every_stage():
    """scatter2 (the level-2 scatter; a no-op with one level) runs between scatter and permute in each example."""
    sbatch = (ROOT / "examples" / "slurm" / "shuffle.sbatch").read_text()
    stages = re.findall(r"--stage (\w+)", sbatch)
    assert stages == ["plan", "scatter", "scatter2", "permute", "finalize"], stages
    assert "--dependency=afterok:$scatter \\" in sbatch and "--dependency=afterok:$scatter2 \\" in sbatch
    header = [line for line in MANIFEST.read_text().splitlines() if line.startswith("#")]
    applied = [m for line in header for m in re.findall(r"sed s/scatter/(\w+)/g", line)]
    assert applied == ["scatter2", "permute"], header


def test_docs_include_the_example_files_verbatim():
    found = includes()
    assert {p for _, p, _ in found} >= {"examples/slurm/shuffle.sbatch", "examples/k8s/shuffle-job.yaml"}
    for doc, path, block in found:
        assert block == (ROOT / path).read_text(), f"{doc} shows a copy of {path} that differs from the file"


def manifests() -> dict[str, dict]:
    """The shipped scatter Job and the scatter2 and permute Jobs its header derives from it (sed s/scatter/.../g)."""
    text = MANIFEST.read_text()
    return {stage: yaml.safe_load(text.replace("scatter", stage)) for stage in ("scatter", "scatter2", "permute")}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("stage", ["scatter", "scatter2", "permute"])
def test_manifest_is_a_valid_indexed_job(stage, version):
    import kubernetes_validate

    job = manifests()[stage]
    version = kubernetes_validate.latest_version() if version == "latest" else version
    # strict: unknown fields are errors too; raises ValidationError, or SchemaNotFoundError if no schema.
    kubernetes_validate.validate(job, version, strict=True)
    assert job["spec"]["completionMode"] == "Indexed"
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--stage") + 1] == stage
    # Kubernetes exports only JOB_COMPLETION_INDEX: --num-tasks must be the Job's completions.
    assert int(cmd[cmd.index("--num-tasks") + 1]) == job["spec"]["completions"]


def test_manifest_command_parses_with_the_cli():
    from shuffler.cli import main

    for job in manifests().values():
        cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
        assert cmd[:2] == ["shuffler", "shuffle"]
        shuffle = main.get_command(None, "shuffle")
        ctx = shuffle.make_context("shuffle", list(cmd[2:]))  # raises click.UsageError on a bad option
        assert ctx.params["num_tasks"] == job["spec"]["completions"]


def test_the_validator_rejects_what_kubernetes_would():
    """The check has teeth: a wrong type, an unknown field, and a field older Kubernetes lacks all fail."""
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    job = manifests()["scatter"]
    bad_type = yaml.safe_load(yaml.safe_dump(job))
    bad_type["spec"]["completions"] = "64"
    typo = yaml.safe_load(yaml.safe_dump(job))
    typo["spec"]["template"]["spec"]["containers"][0]["resource"] = typo["spec"]["template"]["spec"][
        "containers"][0].pop("resources")
    for bad, word in [(bad_type, "'64' is not of type 'integer'"), (typo, "'resource' was unexpected")]:
        with pytest.raises(ValidationError, match=re.escape(word)):
            kubernetes_validate.validate(bad, "1.33", strict=True)
    with pytest.raises(ValidationError, match="backoffLimitPerIndex"):
        kubernetes_validate.validate(job, "1.27", strict=True)
