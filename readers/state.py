"""Resume state: what `state_dict()` returns and what `load_state_dict()` accepts.

A position is (epoch, planned batch index within the epoch) per consumer. Planned batches are fixed by the
dataset's row count, the consumer count, batch_size and drop_last alone (plan.py), never by the data, so a
position means the same rows on any machine and after any number of restarts. A damaged chunk skipped with
on_damaged="skip" shortens the batches it fell in but does not move any position.

The state names the dataset by its content fingerprint (row count and hash sum), not its URL, so a dataset
copied to another bucket still resumes, and a different dataset is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from shuffler.format.manifest import Fingerprint, Manifest

KIND = "activation-shuffler/stream-state"
VERSION = 1

#: Settings that change which rows a position refers to; a state saved under others cannot resume.
ORDER_KEYS = ("world_size", "num_workers", "batch_size", "seed", "shuffle_shards", "drop_last", "buffer_shuffle")
#: Settings only some streams have (permute_buckets, readers/buckets.py); absent on either side reads as None.
OPTIONAL_ORDER_KEYS = ("permute_buckets",)


@dataclass(frozen=True, kw_only=True)
class StreamState:
    """A validated resume state."""

    fingerprint: Fingerprint
    """Content fingerprint of the dataset the state was saved on."""
    settings: dict
    """The ORDER_KEYS values it was saved with."""
    rank: int
    """The rank that saved it (informational: ranks step in lockstep, so any rank's state resumes all)."""
    positions: tuple[tuple[int, int], ...]
    """(epoch, next batch) for each of this rank's consumers (DataLoader workers), in worker order."""
    next_worker: int = 0
    """The worker whose batch comes next in the DataLoader's round-robin (0 outside a DataLoader)."""

    def to_dict(self) -> dict:
        return {
            "kind": KIND,
            "version": VERSION,
            "dataset": self.fingerprint.to_json(),
            **self.settings,
            "rank": self.rank,
            "positions": [list(p) for p in self.positions],
            "next_worker": self.next_worker,
        }


def parse_state(
    state: object, *, manifest: Manifest, settings: dict, url: str, epochs: int, batches_per_epoch: list[int]
) -> StreamState:
    """Check a state against this stream and return it; ValueError naming the mismatch otherwise."""
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise ValueError(f"not a stream state (expected a dict with kind={KIND!r}, got {type(state).__name__})")
    if state.get("version") != VERSION:
        raise ValueError(f"stream state version {state.get('version')!r}; this code reads version {VERSION}")
    saved = Fingerprint.from_json(state.get("dataset"), where="stream state")
    if not manifest.names(saved):
        raise ValueError(
            f"stream state belongs to another dataset (fingerprint {saved}); {url} has fingerprint {manifest.fingerprint}"
        )
    for key in ORDER_KEYS + OPTIONAL_ORDER_KEYS:
        if state.get(key) != settings.get(key):
            what = "world size" if key == "world_size" else key
            hint = " (a DataLoader's state loads into readers.torch.ActivationLoader)" if key == "num_workers" else ""
            raise ValueError(
                f"stream state was saved with {key}={state.get(key)!r}, this stream has {key}={settings.get(key)!r}; "
                f"resuming needs the same {what} (the split of rows into batches depends on it){hint}"
            )
    pos = state.get("positions")
    if not isinstance(pos, list) or len(pos) != len(batches_per_epoch):
        raise ValueError(f"stream state positions {pos!r} must list one [epoch, batch] per worker"[:300])
    out = []
    for w, p in enumerate(pos):
        if not (isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and x >= 0 for x in p)):
            raise ValueError(f"stream state position {p!r} of worker {w} must be [epoch, batch] with integers >= 0")
        e, b = p
        if e > epochs or (e < epochs and b > batches_per_epoch[w]) or (e == epochs and b):
            raise ValueError(
                f"stream state position epoch {e} batch {b} (worker {w}) is past this stream's end "
                f"({epochs} epochs of {batches_per_epoch[w]} batches)"
            )
        out.append((e, b))
    nw = state.get("next_worker", 0)
    if not isinstance(nw, int) or not 0 <= nw < len(out):
        raise ValueError(f"stream state next_worker={nw!r} must be in 0..{len(out) - 1}")
    rank = state.get("rank", 0)
    return StreamState(fingerprint=saved, settings=dict(settings), rank=rank, positions=tuple(out), next_worker=nw)
