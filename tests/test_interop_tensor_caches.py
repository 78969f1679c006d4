"""`shuffler import` of Activault megabatches and Llamascopium chunks (writers/tensor_caches.py).

The caches are built here in the layouts the tools write (Activault: pipeline/vault/hook_uploader.py, a
torch.save dict of "states" [N, seq, d] and "input_ids" per megabatch, plus metadata.json; Llamascopium:
its ActivationWriter, chunk-{N:08d}.safetensors with "activation", "tokens", "mask", "attention_mask").
"""

from __future__ import annotations

import json
import os

import fsspec
import numpy as np
import pytest

try:  # tests/ may or may not be a package (tests/__init__.py); work either way
    from .test_interop_helpers import leaves_nothing, read_all
except ImportError:
    from test_interop_helpers import leaves_nothing, read_all

from click.testing import CliRunner

from shuffler.cli import main
from shuffler.errors import SchemaError
from shuffler.io.dataset import Dataset
from writers.importers import ImportConfig, detect_format, import_activations

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

HOOK = "blocks.3.hook_resid_post"


def activault_cache(root, files=2, n=4, seq=8, d=16, dtype=torch.bfloat16, seed=0):
    """RUN/HOOK as Activault's HookUploader writes it; returns (states, input_ids) in file-name order."""
    g = torch.Generator().manual_seed(seed)
    hook = root / "run" / HOOK
    hook.mkdir(parents=True)
    out = []
    for i in range(files):
        states = torch.randn(n, seq, d, generator=g).to(dtype)
        ids = torch.randint(0, 50_000, (n, seq), generator=g)
        name = f"{i:08x}-aaaa-bbbb-cccc-000000000000--1_0.saved.pt"
        torch.save({"states": states, "input_ids": ids, "tensor_bytes": states.nbytes + ids.nbytes}, hook / name)
        out.append((states, ids))
    meta = {"batch_size": n // 2, "sequence_length": seq, "dtype": str(dtype), "d_in": d, "batches_per_file": 2,
            "shape": [n // 2, seq, d], "input_ids_shape": [n // 2, seq]}
    (hook / "metadata.json").write_text(json.dumps(meta))
    return hook, out


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def test_import_activault_megabatches(tmp_path):
    hook, parts = activault_cache(tmp_path)
    assert detect_format(str(hook)) == "activault"
    r = import_activations(str(hook), str(tmp_path / "ds"))
    assert (r.format, r.column, r.rows, r.d_model, r.dtype, r.context_size) == ("activault", HOOK, 64, 16,
                                                                                 "bfloat16", 8)
    b = read_all(str(tmp_path / "ds"))
    want = np.concatenate([bits(s).reshape(-1, 16) for s, _ in parts])
    np.testing.assert_array_equal(np.asarray(b.acts), want)
    np.testing.assert_array_equal(b.columns["token_id"], np.concatenate([i.reshape(-1).numpy() for _, i in parts]))
    np.testing.assert_array_equal(b.columns["position"], np.tile(np.arange(8), 8))
    md = Dataset.open(str(tmp_path / "ds")).metadata
    assert (md["import_format"], md["hook_name"], md["context_size"]) == ("activault", HOOK, 8)


def test_import_activault_from_object_storage(tmp_path):
    """Activault lives on S3: the same folder under memory:// (fsspec) imports to the same rows."""
    hook, _ = activault_cache(tmp_path, dtype=torch.float16)
    fs = fsspec.filesystem("memory")
    for name in os.listdir(hook):
        fs.pipe(f"/tc-activault/{HOOK}/{name}", (hook / name).read_bytes())
    import_activations(f"memory://tc-activault/{HOOK}", str(tmp_path / "remote"), ImportConfig(batch_bytes=1000))
    import_activations(str(hook), str(tmp_path / "local"))
    a, b = read_all(str(tmp_path / "remote")), read_all(str(tmp_path / "local"))
    np.testing.assert_array_equal(np.asarray(a.acts), np.asarray(b.acts))
    assert a.dtype == "float16" and a.columns.keys() == b.columns.keys()


class Payload:
    """A pickled object whose unpickling would run a command: torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_activault_refuses_pickled_objects(tmp_path):
    hook, _ = activault_cache(tmp_path, files=1)
    marker = tmp_path / "ran"
    torch.save({"states": torch.zeros(2, 4, 16), "input_ids": torch.zeros(2, 4, dtype=torch.long),
                "extra": Payload(marker)}, hook / "ffffffff-0000-0000-0000-000000000000--1_0.saved.pt")
    with pytest.raises(ValueError, match=r"torch.load\(weights_only=True\)"):
        import_activations(str(hook), str(tmp_path / "ds"))
    assert not marker.exists() and leaves_nothing(str(tmp_path / "ds"))


def test_activault_files_must_agree(tmp_path):
    hook, _ = activault_cache(tmp_path, files=1)
    torch.save({"states": torch.zeros(2, 8, 12, dtype=torch.bfloat16), "input_ids": torch.zeros(2, 8, dtype=torch.long)},
               hook / "ffffffff-0000-0000-0000-000000000000--1_0.saved.pt")
    with pytest.raises(SchemaError, match="d_model=12 bfloat16.*first file held d_model=16"):
        import_activations(str(hook), str(tmp_path / "ds"))
    assert leaves_nothing(str(tmp_path / "ds"))


def llamascopium_cache(root, names, samples=2, ctx=8, d=16, seed=0):
    """CACHE/HOOK as Llamascopium's ActivationWriter writes it: one safetensors file per chunk."""
    g = torch.Generator().manual_seed(seed)
    hook = root / "cache" / HOOK
    hook.mkdir(parents=True)
    chunks = {}
    for name in names:
        act = torch.randn(samples, ctx, d, generator=g)
        tokens = torch.randint(0, 32_000, (samples, ctx), generator=g)
        mask = torch.rand(samples, ctx, generator=g) > 0.3
        mask[:, 0] = False  # the BOS token, which Llamascopium masks out
        save_file({"activation": act, "tokens": tokens, "mask": mask, "attention_mask": torch.ones(samples, ctx)},
                  str(hook / f"{name}.safetensors"))
        (hook / f"{name}.meta.json").write_text(json.dumps([{"context_id": i} for i in range(samples)]))
        chunks[name] = (act, tokens, mask)
    return hook, chunks


def test_import_llamascopium_chunks(tmp_path):
    names = ["shard-1-chunk-00000000", "shard-0-chunk-00000001", "shard-0-chunk-00000000"]
    hook, chunks = llamascopium_cache(tmp_path, names)
    assert detect_format(str(hook)) == "llamascopium"
    r = import_activations(str(hook), str(tmp_path / "ds"), ImportConfig(batch_bytes=300))
    order = ["shard-0-chunk-00000000", "shard-0-chunk-00000001", "shard-1-chunk-00000000"]  # (shard, chunk)
    want_rows = sum(int(chunks[n][2].sum()) for n in order)
    assert (r.format, r.column, r.rows, r.dtype) == ("llamascopium", HOOK, want_rows, "float32")
    b = read_all(str(tmp_path / "ds"))
    acts = np.concatenate([chunks[n][0][chunks[n][2]].numpy() for n in order])
    np.testing.assert_array_equal(np.asarray(b.acts), acts)
    np.testing.assert_array_equal(b.columns["token_id"], np.concatenate([chunks[n][1][chunks[n][2]].numpy()
                                                                         for n in order]))
    pos = np.concatenate([np.nonzero(chunks[n][2].numpy())[1] for n in order])
    np.testing.assert_array_equal(b.columns["position"], pos)
    assert 0 not in set(b.columns["position"].tolist())  # masked-out tokens are not rows


def test_import_llamascopium_single_context_chunks_cli(tmp_path):
    hook = tmp_path / HOOK
    hook.mkdir()
    act = torch.randn(6, 4).to(torch.bfloat16)
    save_file({"activation": act, "tokens": torch.arange(6), "mask": torch.ones(6, dtype=torch.bool),
               "attention_mask": torch.ones(6)}, str(hook / "chunk-2.safetensors"))
    r = CliRunner().invoke(main, ["import", str(hook), str(tmp_path / "ds"), "--format", "llamascopium"])
    assert r.exit_code == 0, r.output
    assert "imported 6 rows x 4 bfloat16" in r.output
    b = read_all(str(tmp_path / "ds"))
    np.testing.assert_array_equal(np.asarray(b.acts), bits(act))
    r = CliRunner().invoke(main, ["import", str(tmp_path / "nothing"), str(tmp_path / "ds2"), "--format",
                                  "llamascopium"])
    assert r.exit_code != 0


def test_llamascopium_mask_must_match(tmp_path):
    hook = tmp_path / HOOK
    hook.mkdir()
    save_file({"activation": torch.randn(2, 5, 4), "tokens": torch.zeros(2, 5, dtype=torch.long),
               "mask": torch.ones(2, 4, dtype=torch.bool), "attention_mask": torch.ones(2, 5)},
              str(hook / "chunk-00000000.safetensors"))
    with pytest.raises(SchemaError, match=r"mask \(2, 4\) must match activation \(2, 5, 4\)"):
        import_activations(str(hook), str(tmp_path / "ds"))
    assert leaves_nothing(str(tmp_path / "ds"))
