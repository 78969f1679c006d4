"""ActivationStream(fields=...) (issue 19): only the fields asked for are fetched and decoded, each batch's
fields stay aligned with each other and with the columns, through the torch dataset and ActivationLoader too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from readers import ActivationStream
from readers.torch import ActivationDataset, ActivationLoader
from tests.test_fields import bf16, cols, write_fields
from writers import ShardWriter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def row_ids(b) -> np.ndarray:
    """Each row's source index: its token_id, or the field that holds it exactly (test_fields.field_values);
    check_batch then checks every field against it."""
    if "token_id" in b.columns:
        return np.asarray(b.columns["token_id"]).astype(np.int64)
    if "layer.4" in b.field_names:
        return (-np.asarray(b.field("layer.4"))[:, 0]).astype(np.int64)
    raise AssertionError(f"batch with fields {b.field_names} and no token_id: rows cannot be identified")


def check_batch(b, vals) -> np.ndarray:
    """Every field of batch b holds the values of the rows its ids name; returns the ids."""
    ids = row_ids(b)
    for name in b.field_names:
        got = b.field(name)
        if isinstance(got, torch.Tensor):
            got = got.view(torch.int16).numpy().view(np.uint16) if got.dtype == torch.bfloat16 else got.numpy()
        want = {"layer.2": lambda x: bf16(x), "layer.4": lambda x: x, "mlp_out.4": lambda x: x.astype(np.float16)}[name]
        np.testing.assert_array_equal(got, want(vals[name][ids]), err_msg=name)
    return ids


@pytest.mark.parametrize("device", [None, "cpu"])
@pytest.mark.parametrize("fields", [(), ("layer.4",), ("mlp_out.4", "layer.2")])
def test_stream_decodes_the_fields_asked_for(tmp_path, device, fields):
    url = str(tmp_path / "d")
    vals = write_fields(url)
    s = ActivationStream(url, batch_size=256, seed=3, device=device, fields=fields, columns=("token_id",))
    seen = []
    for b in s:
        assert b.field_names == (fields or ("layer.2", "layer.4", "mlp_out.4"))
        assert b.acts is b.field(b.field_names[0])  # .acts is the first field asked for
        if device == "cpu":
            assert b.acts.dtype == {"layer.2": torch.bfloat16, "layer.4": torch.float32,
                                    "mlp_out.4": torch.float16}[b.field_names[0]]
        seen.append(check_batch(b, vals))
    assert sorted(np.concatenate(seen).tolist()) == list(range(3000))  # every row once


def test_one_field_costs_its_share_of_the_bytes(tmp_path):
    """Reading layer.4 alone fetches only its frames (160 of 240 activation bytes a row, no columns)."""
    url = str(tmp_path / "d")
    write_fields(url)
    every = ActivationStream(url, batch_size=500, shuffle_shards=False)
    one = ActivationStream(url, batch_size=500, shuffle_shards=False, fields=("layer.2",))
    for s in (every, one):
        for _ in s:
            pass
    assert every.stats.rows == one.stats.rows == 3000
    assert one.stats.bytes_decoded == 3000 * 48 and every.stats.bytes_decoded == 3000 * 240
    assert one.stats.bytes_read < 0.4 * every.stats.bytes_read  # 48 of 256 raw bytes a row; floats compress less


def test_buffer_shuffle_and_torch_loader_keep_fields_aligned(tmp_path):
    url = str(tmp_path / "d")
    vals = write_fields(url)
    s = ActivationStream(url, batch_size=200, buffer_shuffle=700, fields=("layer.4", "mlp_out.4"))
    ids = np.concatenate([check_batch(b, vals) for b in s])
    assert sorted(ids.tolist()) == list(range(3000)) and not (np.diff(ids) == 1).all()
    ds = ActivationDataset(url, batch_size=300, fields=("mlp_out.4", "layer.4"))
    ids = np.concatenate([check_batch(b, vals) for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)])
    assert sorted(ids.tolist()) == list(range(3000))
    loader = ActivationLoader(ActivationDataset(url, batch_size=300, fields=("layer.2", "layer.4")), num_workers=2)
    it = iter(loader)
    first = [check_batch(next(it), vals) for _ in range(4)]
    state = loader.state_dict()
    del it
    again = ActivationLoader(ActivationDataset(url, batch_size=300, fields=("layer.2", "layer.4")), num_workers=2)
    again.load_state_dict(state)
    rest = [check_batch(b, vals) for b in again]
    assert sorted(np.concatenate(first + rest).tolist()) == list(range(3000))


def test_unknown_field_is_refused(tmp_path):
    url = str(tmp_path / "d")
    write_fields(url, n=100)
    with pytest.raises(ValueError, match=r"fields \['layer\.9'\]: unknown \['layer\.9'\]; the dataset has \['layer\.2', 'layer\.4', 'mlp_out\.4'\]"):
        ActivationStream(url, batch_size=10, fields=("layer.9",))
    with pytest.raises(ValueError, match="a name repeats"):
        ActivationStream(url, batch_size=10, fields=("layer.4", "layer.4"))
    one = str(tmp_path / "one")
    with ShardWriter(one, d_model=4, dtype="float32") as w:
        w.write(np.ones((10, 4), np.float32), **cols(10))
    b = next(iter(ActivationStream(one, batch_size=10, fields=("acts",))))  # a one-field dataset's field is "acts"
    assert b.field("acts").shape == (10, 4) and b.field_names == ("acts",)
    with pytest.raises(ValueError, match=r"unknown \['layer\.4'\]; the dataset has \['acts'\]"):
        ActivationStream(one, batch_size=10, fields=("layer.4",))


def test_staged_buffers_carry_packed_fields(tmp_path, monkeypatch):
    """The CUDA path's logic on CPU (as tests/test_readers_torch.py does for one field): packed rows of several
    fields are staged in reused uint8 buffers, copied, then split into each field's tensor of its true dtype."""
    import readers.stream
    from readers.device import Buffers

    url = str(tmp_path / "d")
    vals = write_fields(url)
    made = []

    class Event:
        def synchronize(self):
            pass

    class CpuStaged(Buffers):
        def __init__(self, schema, batch_size, device):
            super().__init__(schema, batch_size, device, staged=True)
            made.append(self)

        def _new_pinned(self):  # as Buffers._new_pinned, without pin_memory (no CUDA here)
            assert self.schema.multi and self.schema.row_width == 24 * 2 + 16 * 2
            return torch.empty((self.batch_size, self.schema.row_width), dtype=torch.uint8)

        def _record(self):
            return Event()

        def _transfer(self, t):
            return t.clone()

    monkeypatch.setattr(readers.stream, "Buffers", CpuStaged)
    s = readers.stream.ActivationStream(url, batch_size=128, device="cpu", fields=("layer.2", "mlp_out.4"),
                                        columns=("token_id",), prefetch=2)
    ids = []
    for b in s:
        assert b.field("layer.2").dtype == torch.bfloat16 and b.field("mlp_out.4").dtype == torch.float16
        ids.append(check_batch(b, vals))
    assert sorted(np.concatenate(ids).tolist()) == list(range(3000))
    assert made[0].allocated <= 6  # reused, not one per batch
