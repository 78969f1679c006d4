"""Store or recompute (shuffler/shuffling/recompute.py, `shuffler cost`): the break-even is where the two costs
cross, each input moves the side it should, and bad input is named."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from shuffler.cli import main
from shuffler.cli.options import mismatches
from shuffler.format.schema import Schema
from shuffler.shuffling.costmodel import Cluster, estimate
from shuffler.shuffling.plan import DTYPE_RATIO, PlanRequest, make_plan
from shuffler.shuffling.recompute import Economics, Workload, compare


def _estimate(workload: Workload):
    plan = make_plan(PlanRequest(rows=workload.tokens * workload.hooks,
                                 schema=Schema(dtype=workload.dtype, d_model=workload.d_model), memory=64 << 30,
                                 workers=8, stored_bytes=workload.stored_bytes, scratch_remote=True, dst_remote=True,
                                 machine_memory=0))
    return estimate(plan, Cluster(nodes=4, cores=8, memory=512 << 30))


def _compare(workload: Workload, economics: Economics):
    return compare(workload, economics, shuffle=_estimate(workload))


BASE = Workload(tokens=10**9, d_model=4096, dtype="bfloat16")
ECON = Economics(capture_rate=20_000)


@pytest.mark.parametrize("hooks,shared", [(1, True), (32, True), (32, False)])
@pytest.mark.parametrize("months", [0.25, 1, 6])
def test_break_even_is_where_storing_stops_costing_more(hooks, shared, months):
    w = dataclasses.replace(BASE, hooks=hooks, shared_forward=shared)
    c = _compare(w, dataclasses.replace(ECON, months=months))
    r = c.break_even
    if r is None:
        for reads in (1, 10, 1000):
            assert _compare(dataclasses.replace(w, reads=reads), ECON).verdict == "recompute"
        return
    at = _compare(dataclasses.replace(w, reads=r), dataclasses.replace(ECON, months=months))
    assert at.store <= at.recompute + 1e-6
    if r > 1:
        before = _compare(dataclasses.replace(w, reads=r - 1), dataclasses.replace(ECON, months=months))
        assert before.store > before.recompute
        assert before.verdict == "recompute" and at.verdict == "store"


def test_each_input_moves_the_side_it_should():
    c = _compare(BASE, ECON)
    assert c.store == pytest.approx(c.capture + c.write + c.shuffle + c.hold + c.keep + c.read)
    # Storage while the shuffle runs: source and output plus the intermediates at their peak.
    est = _estimate(BASE)
    held = 2 * BASE.stored_bytes + est.scratch_bytes
    assert c.hold == pytest.approx(held / 1e9 * 0.023 * est.wall_s / 3600 / 730) and c.hold > 0
    assert c.recompute == pytest.approx(c.capture)
    assert c.capture == pytest.approx(10**9 / 20_000 / 3600 * 2.5)
    raw = 10**9 * Schema(dtype="bfloat16", d_model=4096).row_bytes
    assert BASE.stored_bytes == round(raw / DTYPE_RATIO["bfloat16"])
    assert c.keep == pytest.approx(BASE.stored_bytes / 1e9 * 0.023)
    # Hooks multiply what is stored, not what one capture costs.
    many = _compare(dataclasses.replace(BASE, hooks=8), ECON)
    assert many.capture == pytest.approx(c.capture) and many.keep == pytest.approx(8 * c.keep)
    assert many.recompute == pytest.approx(c.recompute)
    # ... unless each hook's SAEs train on their own: then recomputing runs the model once per hook.
    alone = _compare(dataclasses.replace(BASE, hooks=8, shared_forward=False), ECON)
    assert alone.recompute == pytest.approx(8 * c.recompute)
    assert alone.break_even < many.break_even
    # Better compression and cheaper storage lower the break-even; a faster GPU raises it.
    assert _compare(dataclasses.replace(BASE, compression=3.0), ECON).break_even <= c.break_even
    assert _compare(BASE, dataclasses.replace(ECON, storage_price=0.002)).break_even < c.break_even
    assert _compare(BASE, dataclasses.replace(ECON, capture_rate=200_000)).break_even > c.break_even


def test_never_when_a_read_costs_as_much_as_a_capture():
    free_gpu = _compare(BASE, dataclasses.replace(ECON, gpu_price=0.0))
    assert free_gpu.break_even is None and free_gpu.verdict == "recompute"
    assert "never" in free_gpu.report()


@pytest.mark.parametrize("kw,words", [
    (dict(tokens=0), "tokens=0 must be an integer >= 1"),
    (dict(hooks=1.5), "hooks=1.5 must be an integer"),
    (dict(dtype="int8"), "dtype='int8' is not one of"),
    (dict(compression=0.0), "compression=0.0 must be a ratio > 0"),
])
def test_bad_workloads_are_named(kw, words):
    with pytest.raises(ValueError, match=words):
        dataclasses.replace(BASE, **kw)


def test_bad_economics_are_named():
    with pytest.raises(ValueError, match="capture_rate=0 must be > 0 tokens per second"):
        Economics(capture_rate=0)
    with pytest.raises(ValueError, match="months=-1 must be a number >= 0"):
        Economics(capture_rate=1, months=-1)


def _cost():
    return main.get_command(click.Context(main), "cost")


def test_cost_options_match_their_config_fields():
    assert mismatches(_cost(), Workload) == []
    assert mismatches(_cost(), Economics) == []


def test_cost_cli_report_json_and_errors():
    args = ["cost", "--tokens", "1e9", "--d-model", "4096", "--capture-rate", "20000", "--reads", "50"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "break-even" in r.output and "at 50 run(s): store" in r.output
    r = CliRunner().invoke(main, [*args, "--json"])
    doc = json.loads(r.output)
    assert doc["verdict"] == "store" and doc["break_even_reads"] <= 50
    assert doc["dollars"]["recompute"] == pytest.approx(50 * doc["dollars"]["capture"])
    assert doc["shuffle"]["passes"][0]["name"] == "pass 1 scatter"
    r = CliRunner().invoke(main, [*args, "--threads", "3", "--json"])
    assert json.loads(r.output)["shuffle"]["plan"]["request"]["threads"] == 3
    r = CliRunner().invoke(main, ["cost", "--tokens", "1.5", "--d-model", "8", "--capture-rate", "1"])
    assert r.exit_code == 2 and "--tokens" in r.output and "whole number of tokens" in r.output
    r = CliRunner().invoke(main, ["cost", "--tokens", "1e9", "--d-model", "8"])
    assert r.exit_code == 2 and "--capture-rate" in r.output


def test_cost_cli_in_a_subprocess():
    out = subprocess.run([sys.executable, "-c", "from shuffler.cli import main; main()", "cost", "--tokens", "4e9",
                          "--d-model", "3584", "--hooks", "126", "--capture-rate", "20000", "--reads", "8",
                          "--no-shared-forward", "--memory", "192GiB", "--node-memory", "1TiB"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "8 x 126 captures" in out.stdout and ": store (saves" in out.stdout
