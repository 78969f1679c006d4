"""Security: no pickle on the data path, no object smuggled in by a manifest, marker or checkpoint, and
credentials never logged or written into anything the tools write (objects, manifests, checkpoints, logs)."""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from shuffler import FormatError, Manifest
from shuffler.cli import main
from shuffler.shuffling.map import MapOutput
from shuffler.storage.storage import Storage

from .test_reliability_shuffle import ROOT
from .test_shuffle import make_dataset

PRODUCT = ["shuffler", "readers", "trainer", "writers"]  # everything a dataset or checkpoint passes through
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}


def unsafe_calls(source: str, where: str) -> list[str]:
    """Deserialisers that can run code, found in `source`: pickle-family imports, np.load(allow_pickle=True),
    torch.load without weights_only=True, pandas.read_pickle, yaml.load without a safe loader, eval/exec."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}:{node.lineno} import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}

        def is_true(v) -> bool:
            return isinstance(v, ast.Constant) and v.value is True

        if name == "load" and owner in ("np", "numpy") and "allow_pickle" in kw and not (
                isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
            found.append(f"{where}:{node.lineno} np.load(allow_pickle=...)")
        if name == "load" and owner == "torch" and not is_true(kw.get("weights_only")):
            found.append(f"{where}:{node.lineno} torch.load without weights_only=True")
        if name in ("read_pickle", "loads") and owner in ("pd", "pandas", "pickle", "dill", "cloudpickle"):
            found.append(f"{where}:{node.lineno} {owner}.{name}")
        if name == "load" and owner == "yaml" and "Loader" not in kw:
            found.append(f"{where}:{node.lineno} yaml.load without Loader")
        if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
            found.append(f"{where}:{node.lineno} {f.id}()")
    return found


def test_scanner_finds_each_unsafe_form():
    bad = """
import pickle
from dill import loads
import numpy as np, torch, yaml, pandas as pd
np.load(p, allow_pickle=True)
torch.load(p)
torch.load(p, weights_only=False)
pd.read_pickle(p)
yaml.load(s)
eval("1")
"""
    assert len(unsafe_calls(bad, "x")) == 8
    good = """
import numpy as np, torch, yaml
np.load(p)
np.load(p, allow_pickle=False)
torch.load(p, weights_only=True)
yaml.load(s, Loader=yaml.SafeLoader)
model.eval()
"""
    assert unsafe_calls(good, "x") == []


def test_no_pickle_anywhere_on_the_data_path():
    files = sorted(p for d in PRODUCT for p in (Path(ROOT) / d).rglob("*.py"))
    assert len(files) > 30
    found = [f for p in files for f in unsafe_calls(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == [], "unsafe deserialisation on the data path:\n" + "\n".join(found)


class Canary:
    """Unpickling this runs code: it creates the file `path`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_manifest_cannot_smuggle_objects(tmp_path):
    canary = tmp_path / "ran"
    # A pickle where the manifest belongs: refused as not JSON, nothing run.
    with pytest.raises(FormatError, match="not valid JSON"):
        Manifest.loads(pickle.dumps(Canary(str(canary))), where="m.json")
    # Python-object markers of object-serialising JSON libraries stay plain data.
    base = {"format": "activation-shuffler", "format_version": 1, "dtype": "float16", "d_model": 4, "columns": [],
            "num_rows": 0, "fingerprint": {"rows": 0, "sum": "0"}, "shards": [],
            "metadata": {"py/object": "os.system", "__reduce__": ["os.system", ["touch " + str(canary)]],
                         "!!python/object/apply:os.system": [str(canary)]}}
    m = Manifest.loads(json.dumps(base).encode(), where="m.json")
    assert m.metadata["py/object"] == "os.system" and isinstance(m.metadata["__reduce__"], list)
    assert not canary.exists()


def test_intermediate_marker_and_planted_dictionary_cannot_smuggle_objects(tmp_path):
    canary = tmp_path / "ran"
    buf = io.BytesIO()
    np.save(buf, np.array([Canary(str(canary))], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match="not an intermediate index"):
        MapOutput.from_bytes(buf.getvalue(), where="map-000000.idx", buckets=4)
    from writers.synth import PLANTED, load_planted

    store = Storage(str(tmp_path / "ds"))
    store.write(PLANTED, buf.getvalue())
    with pytest.raises(ValueError, match="allow_pickle"):
        load_planted(str(tmp_path / "ds"))
    assert not canary.exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from trainer import TrainConfig, train
    from writers.synth import SynthConfig, synth

    base = tmp_path_factory.mktemp("sec")
    url = str(base / "ds")
    synth(url, SynthConfig(rows=2048, d_model=8, docs=64, seed=1, k=2, features=16))
    cfg = TrainConfig(n_latents=16, k=2, batch_size=256, tokens=1024, seed=0)
    return url, cfg, train


def test_checkpoint_cannot_smuggle_objects(tiny_run, tmp_path):
    """A checkpoint's weights file replaced by a pickle that runs code: --resume refuses it (torch.load with
    weights_only=True), and the code never runs."""
    url, cfg, train = tiny_run
    out = tmp_path / "run"
    train(url, out, cfg, device="cpu", progress=False)
    (pt,) = (out / "checkpoints").glob("step-*/shard-00000.pt")
    canary = tmp_path / "ran"
    import torch

    torch.save({"sae": Canary(str(canary))}, pt)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(url, out, dataclasses.replace(cfg, tokens=2048), device="cpu", resume=True, progress=False)
    assert not canary.exists()


# -- credentials -------------------------------------------------------------------------------------------

KEY_ID = "AKIACANARYSHUFFLER77"
SECRET = "cAnArY/sEcReT+shuffler0TEST0d0n0t0leak0x9"
TOKEN = "CANARYSESSIONTOKENshufflerFwoGZXIvYXdzEJr"


def all_bytes_under(store: Storage) -> dict[str, bytes]:
    return {n: store.read(n) for n in store.list("")}


def test_credentials_are_never_written_or_logged(s3_endpoint, tmp_path, monkeypatch, caplog, capfd):
    """A shuffle, a refused shuffle, verify (the CLI) and a training run, on S3 from this process,
    with distinctive credentials in the environment: they appear in no object written to S3, no local file
    written (checkpoints, log.jsonl), no output or log line, and no error message."""
    for k, v in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN}.items():
        monkeypatch.setenv(k, v)
    prefix = f"s3://test-bucket/creds-{os.getpid()}"
    src, dst = prefix + "/raw", prefix + "/out"
    make_dataset(src, 3000)
    from shuffler.shuffling.run import shuffle
    from trainer import TrainConfig, train

    caplog.set_level(logging.INFO)  # every logger at INFO, the project's at DEBUG
    for name in PRODUCT:
        caplog.set_level(logging.DEBUG, logger=name)
    texts = []
    shuffle(src, dst, seed=3, buckets=3, workers=1, chunk_bytes=4096, shard_bytes=32768, progress=True)
    with pytest.raises(FileExistsError) as info:  # an error message, too
        shuffle(src, dst, seed=4, workers=1)
    texts.append(str(info.value))
    r = CliRunner().invoke(main, ["verify", src, dst, "--full"])
    texts.append(r.output)
    assert r.exit_code == 0 and r.output.startswith("OK:"), r.output
    out = tmp_path / "run"
    train(dst, out, TrainConfig(n_latents=16, k=2, batch_size=256, tokens=1024, seed=0), device="cpu", progress=False)
    captured = capfd.readouterr()
    texts += [captured.out, captured.err, caplog.text]
    blobs = {f"s3 {n}": b for n, b in all_bytes_under(Storage(prefix)).items()}
    blobs.update({f"local {p}": p.read_bytes() for p in out.rglob("*") if p.is_file()})
    assert any(n.endswith("manifest.json") for n in blobs) and any(n.endswith(".pt") for n in blobs)
    for secret in (KEY_ID, SECRET, TOKEN):
        leaks = [n for n, b in blobs.items() if secret.encode() in b] + [t[:200] for t in texts if secret in t]
        assert leaks == [], f"{secret[:8]}... found in {leaks}"
