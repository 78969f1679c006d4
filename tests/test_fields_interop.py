"""Export and import with several fields (issue 19): export writes one field at a time (--field), refusing a
several-field dataset without it; import writes a one-field dataset."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from shuffler import Dataset
from shuffler.cli import main
from shuffler.interop.exporter import ExportConfig, export_dataset
from shuffler.storage.storage import Storage
from tests.test_fields import bf16, write_fields
from writers.importers import ImportConfig, import_activations


def test_export_needs_a_field_and_writes_that_one(tmp_path):
    src = str(tmp_path / "src")
    vals = write_fields(src, n=1000)
    out = tmp_path / "l4.parquet"
    r = CliRunner().invoke(main, ["export", src, str(out)])
    assert r.exit_code != 0 and not out.exists()
    assert "holds 3 activation fields ['layer.2', 'layer.4', 'mlp_out.4']" in r.output and "--field NAME" in r.output
    r = CliRunner().invoke(main, ["export", src, str(out), "--field", "layer.9"])
    assert r.exit_code != 0 and "unknown ['layer.9']" in r.output and not out.exists()
    r = CliRunner().invoke(main, ["export", src, str(out), "--field", "layer.4"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    ids = t.column("token_id").to_numpy()
    np.testing.assert_array_equal(np.stack(t.column("acts").to_numpy(zero_copy_only=False)), vals["layer.4"][ids])
    assert ids.tolist() == list(range(1000))
    # bfloat16 field to arrow: its bits, with the dtype in the metadata, aligned with the same token ids
    rep = export_dataset(src, str(tmp_path / "l2.arrow"), ExportConfig(format="arrow", field="layer.2"))
    assert rep.rows == 1000
    import pyarrow as pa

    with pa.memory_map(str(tmp_path / "l2.arrow")) as f:
        t2 = pa.ipc.open_file(f).read_all()
    a = np.stack(t2.column("acts").to_numpy(zero_copy_only=False)).astype(np.uint16)
    np.testing.assert_array_equal(a, bf16(vals["layer.2"][t2.column("token_id").to_numpy()]))


def test_saelens_export_of_a_field_and_import_back(tmp_path):
    src = str(tmp_path / "src")
    vals = write_fields(src, n=1024)
    cache = str(tmp_path / "cache")
    rep = export_dataset(src, cache, ExportConfig(format="saelens", field="mlp_out.4", context_size=128))
    assert rep.column == "mlp_out.4" and rep.rows == 1024
    back = str(tmp_path / "back")
    import_activations(cache, back, ImportConfig())
    ds = Dataset.open(back)
    assert ds.fields == ("acts",) and ds.field_spec("acts") == (16, "float16")  # import writes one field
    b = ds.read_shard(0)
    np.testing.assert_array_equal(b.acts, vals["mlp_out.4"][b.columns["token_id"]].astype(np.float16))


def test_one_field_export_unchanged_and_field_acts_accepted(tmp_path):
    from writers import ShardWriter

    one = str(tmp_path / "one")
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    with ShardWriter(one, d_model=4, dtype="float32", columns=()) as w:
        w.write(x)
    a, b = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    export_dataset(one, a, ExportConfig(format="parquet"))
    export_dataset(one, b, ExportConfig(format="parquet", field="acts"))
    assert Storage(str(tmp_path)).read("a.parquet") == Storage(str(tmp_path)).read("b.parquet")
    with pytest.raises(ValueError, match=r"unknown \['layer\.4'\]; the dataset has \['acts'\]"):
        export_dataset(one, str(tmp_path / "c.parquet"), ExportConfig(format="parquet", field="layer.4"))
