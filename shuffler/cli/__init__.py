"""The `shuffler` command line. Commands are loaded lazily, so `shuffler inspect` never imports torch.

Each command is a module of this package (shuffler/cli/), the one layer that composes the core, the
producers (writers), the consumers (readers) and the trainer; COMMANDS maps its name to "module:function" and
its one-line help.
Errors the user can fix (bad input, missing data, damaged bytes) end with a one-line message naming what
and where, and exit status 1; nothing is left half-visible (the writers and the shuffle commit last).
"""

from __future__ import annotations

import importlib
import sys

import click

from shuffler.units import parse_size

# name -> ("module:function", the one line `shuffler --help` shows). The line is written here, not read from
# the command, so listing the commands imports nothing (train and capture pull in torch, 4-7 s here).
# tests/test_cli_data.py checks that every command has a line and loads.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("shuffler.cli.data:synth_cmd",
              "Write synthetic activations built from a planted dictionary of sparse features."),
    "inspect": ("shuffler.cli.data:inspect_cmd", "Describe the dataset at URL; with --check, prove every chunk intact."),
    "seal": ("shuffler.cli.data:seal_cmd",
             "Join the part manifests of several producers at URL into the dataset manifest."),
    "shuffle": ("shuffler.cli.shuffle:shuffle_cmd",
                "Globally shuffle SRC datasets into DST: exact, deterministic, resumable."),
    "plan": ("shuffler.cli.shuffle:plan_cmd",
             "Print the shuffle plan (buckets, tasks, reads, memory, cost) for a dataset or a size."),
    "cost": ("shuffler.cli.shuffle:cost_cmd",
             "Store or recompute: what keeping activations costs against regenerating them per run."),
    "verify": ("shuffler.cli.shuffle:verify_cmd", "Check that DST is a permutation of the SRC datasets."),
    "train": ("shuffler.cli.train:train_cmd", "Train a TopK sparse autoencoder on a (shuffled) dataset."),
    "capture": ("shuffler.cli.capture:capture_cmd", "Capture a model layer's activations over text into a dataset."),
    "import": ("shuffler.cli.interop:import_cmd",
               "Import activations from a SAELens cache, Parquet, Arrow IPC or .npy files."),
    "export": ("shuffler.cli.interop:export_cmd",
               "Export a dataset as Arrow IPC, Parquet or a SAELens activation cache."),
    "demo": ("shuffler.cli.demo:demo_cmd",
             "The main job end to end: capture from a real model, shuffle, verify, train, show features."),
}


class LazyGroup(click.Group):
    """click's documented lazy-loading pattern: import a command's module only when it is used."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx, name):
        return self._load(name, quiet=False) if name in COMMANDS else None

    def _load(self, name: str, *, quiet: bool):
        module, attr = COMMANDS[name][0].split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if quiet:
                return None
            raise click.ClickException(
                f"command {name!r} needs a package that is not installed ({e.name}); "
                "see README.md for the extras (s3, torch, ray, capture)"
            ) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except (ValueError, OSError, RuntimeError, ImportError) as e:
            # ValueError covers FormatError, ChecksumError and SchemaError; OSError covers missing objects.
            raise click.ClickException(f"{type(e).__name__}: {e}") from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="activation-shuffler")
def main() -> None:
    """Store, globally shuffle and stream transformer activations for SAE training.

    A dataset is a URL prefix (local path, s3://bucket/prefix, memory://name) holding shards and a
    manifest.json written last. Typical flow:

    \b
      shuffler synth data/raw --rows 1000000 --d-model 768 --dtype bfloat16
      shuffler inspect data/raw --check
      shuffler shuffle data/raw data/shuffled --seed 0 --memory 4GiB
      shuffler verify data/raw data/shuffled

    Run `shuffler COMMAND --help` for each command's options.
    """


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value, what=param.name if param else "size")
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


def run() -> None:  # pragma: no cover - thin wrapper for `python -m shuffler`
    sys.exit(main())
