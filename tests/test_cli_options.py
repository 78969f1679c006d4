"""Each CLI option that stands for a config field has the field's default and starts its help with the field's
docstring (shuffler/cli/options.py), so editing one side only fails here."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from shuffler.cli import main
from shuffler.cli.demo import DemoConfig
from shuffler.cli.options import field_docs, format_size, mismatches, option, option_fields, options
from shuffler.interop.exporter import ExportConfig
from shuffler.shuffling.run import ShuffleConfig
from shuffler.units import parse_size
from trainer.config import TrainConfig
from writers.capture import CaptureConfig
from writers.importers import ImportConfig
from writers.synth import SynthConfig


def _fields(cls, *, but=()):
    return {f.name for f in dataclasses.fields(cls)} - set(but)


# command -> (its config, renames {parameter: field}, the fields it must cover)
COMMANDS = {
    "shuffle": (ShuffleConfig, {}, _fields(ShuffleConfig)),
    "plan": (ShuffleConfig, {}, {"memory", "buckets", "levels", "workers", "threads", "scratch", "scratch_level", "scratch_prefixes", "level", "chunk_bytes",
                                 "shard_bytes"}),
    "train": (TrainConfig, {"latents": "n_latents", "prefetch": "reader_prefetch", "threads": "reader_threads",
                            "input_field": "input"},
              _fields(TrainConfig, but=("adam_betas", "adam_eps", "init_tokens"))),
    "import": (ImportConfig, {}, _fields(ImportConfig)),
    "export": (ExportConfig, {}, _fields(ExportConfig, but=("threads",))),
    "capture": (CaptureConfig, {}, _fields(CaptureConfig)),
    "synth": (SynthConfig, {}, _fields(SynthConfig, but=("doc_features", "doc_bias", "noise"))),
    "demo": (DemoConfig, {}, {"capture_tokens", "train_tokens", "latents", "k", "batch_size", "memory", "transcoder"}),
}


def _command(name):
    return main.get_command(click.Context(main), name)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_options_match_their_config_fields(name):
    cls, renames, expected = COMMANDS[name]
    cmd = _command(name)
    assert mismatches(cmd, cls, renames=renames) == []
    assert set(option_fields(cmd, cls, renames=renames).values()) == expected


# -- the checker can fail ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class Toy:
    """A config for the checker's own tests."""

    rows: int
    """Rows to make."""
    level: int = 1
    """zstd level,
    spread over two lines."""
    chunk_bytes: int = 8 << 20
    """Uncompressed bytes per chunk."""
    workers: int | None = None
    """Worker processes; None uses every core."""
    fast: bool = False
    """Go fast."""
    autocast: bool | None = None
    """bfloat16 autocast; None picks."""


def test_checker_reports_a_default_or_help_edited_on_one_side():
    @click.command("toy")
    @click.option("--level", type=int, default=3, help="zstd level, spread over two lines.")
    @click.option("--chunk-bytes", default="8MiB", help="Bytes per chunk.")
    @click.option("--workers", type=int, help="Worker processes; unset uses every core. More words.")
    def toy(level, chunk_bytes, workers):
        pass

    problems = mismatches(toy, Toy)
    assert len(problems) == 3, problems
    assert "toy --level vs Toy.level: default 3 differs from the field's 1" in problems[0]
    assert "toy --chunk-bytes vs Toy.chunk_bytes: help 'Bytes per chunk.' does not start" in problems[1]
    assert "default '8MiB' differs from the field's 8388608" in problems[2]  # untyped: the string stays a string


def test_checker_follows_renames_and_skips_required_options():
    @click.command("toy")
    @click.option("--n", "n", type=int, required=True, help="Rows to make.")
    @click.option("--jobs", "jobs", type=int, default=4, help="Worker processes; unset uses every core.")
    def toy(n, jobs):
        pass

    assert option_fields(toy, Toy) == {}
    assert option_fields(toy, Toy, renames={"n": "rows", "jobs": "workers"}) == {"n": "rows", "jobs": "workers"}
    assert mismatches(toy, Toy, renames={"n": "rows", "jobs": "workers"}) == [
        "toy --jobs vs Toy.workers: default 4 differs from the field's None"]


def test_derived_options_take_name_type_default_and_help_from_the_field():
    @click.command("toy")
    @option(Toy, "rows", required=True)
    @options(Toy, "level", "chunk_bytes", "workers", "fast", "autocast")
    def toy(**kw):
        click.echo(repr(sorted(kw.items())))

    assert mismatches(toy, Toy) == []
    assert [p.opts[0] for p in toy.params] == ["--rows", "--level", "--chunk-bytes", "--workers", "--fast", "--autocast"]
    assert toy.params[5].secondary_opts == ["--no-autocast"]
    r = CliRunner().invoke(toy, ["--rows", "5"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr(sorted(dict(rows=5, level=1, chunk_bytes=8 << 20, workers=None, fast=False,
                                                autocast=None).items()))
    r = CliRunner().invoke(toy, ["--rows", "5", "--chunk-bytes", "1GiB", "--workers", "3", "--fast", "--no-autocast"])
    assert "('chunk_bytes', 1073741824)" in r.output and "('workers', 3)" in r.output
    assert "('fast', True)" in r.output and "('autocast', False)" in r.output
    r = CliRunner().invoke(toy, ["--help"])
    assert "zstd level, spread over two lines. [default: 1]" in " ".join(r.output.split())
    assert "[default: 8MiB]" in r.output and "--autocast / --no-autocast" in r.output
    r = CliRunner().invoke(toy, ["--rows", "5", "--chunk-bytes", "lots"])
    assert r.exit_code == 2 and "'lots' is not a size" in r.output


def test_extra_help_and_overrides():
    @click.command("toy")
    @option(Toy, "level", "--zstd-level", "level", extra="Higher is slower.", type=click.IntRange(-7, 22))
    def toy(level):
        pass

    (p,) = toy.params
    assert p.opts == ["--zstd-level"] and p.help == "zstd level, spread over two lines. Higher is slower."
    assert mismatches(toy, Toy) == []


def test_field_docs_and_unknown_fields():
    assert field_docs(Toy)["level"] == "zstd level, spread over two lines."
    assert field_docs(ShuffleConfig)["chunk_bytes"] == "Uncompressed bytes per chunk of output and intermediates."
    with pytest.raises(ValueError, match="Toy has no field 'levels'; its fields are rows, level"):
        option(Toy, "levels")


@pytest.mark.parametrize("n, text", [(8 << 20, "8MiB"), (256 << 20, "256MiB"), (2 << 30, "2GiB"),
                                     (500 * 10**6, "500MB"), (1000, "1kB"), (3 << 10, "3KiB"), (1536, "1536"), (7, "7"), (0, "0")])
def test_format_size_is_exact_and_parses_back(n, text):
    assert format_size(n) == text
    assert parse_size(text) == n


@pytest.mark.parametrize("args,missing", [
    (["synth", "OUT", "--d-model", "8"], "--rows"),
    (["synth", "OUT", "--rows", "8"], "--d-model"),
    (["capture", "OUT", "--model", "m", "--max-tokens", "10"], "--layer"),
    (["cost", "--tokens", "1e9", "--d-model", "8"], "--capture-rate"),
])
def test_a_required_derived_option_left_out_is_named(args, missing, tmp_path):
    # click 8.3+ took the derived default=None as a value given: the command ran with None and failed inside.
    r = CliRunner().invoke(main, [str(tmp_path / a) if a == "OUT" else a for a in args])
    assert r.exit_code == 2, r.output
    assert f"Missing option '{missing}'" in r.output
    assert not (tmp_path / "OUT").exists()
