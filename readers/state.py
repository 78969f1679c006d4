"""Resume state: what `state_dict()` returns and what `load_state_dict()` accepts, at any world size.

A state names the dataset by its content fingerprint (row count and hash sum), not its URL, so a dataset
copied to another bucket still resumes, and a different dataset is refused. It records the settings that fix
each epoch's order (seed, shuffle_shards, buffer_shuffle, permute_buckets: these must match on resume), the
layout it was saved under (world_size, num_workers, batch_size, drop_last, and where that layout began:
`start_epoch` and `pending`, readers/layout.py), and the position of each of the saving rank's DataLoader
workers as (epoch, batch index in the layout).

Loading under the same layout continues at the same positions: the batches after a resume are exactly those an
uninterrupted run would have yielded next. Loading under another world size, worker count, batch size or
drop_last turns the positions into steps (consumers step in lockstep, so one rank's state gives every
consumer's), takes the rows no consumer has read (Layout.remainder) and cuts them among the new consumers.

Version 1 states (no layout fields) read as a layout that began at epoch 0. Their buffer_shuffle blocks were cut
per consumer rather than from the epoch's order, so a version-1 state with buffer_shuffle that stops inside an
epoch is refused, saying how to go on.
"""

from __future__ import annotations

from dataclasses import dataclass

from readers.layout import Layout, Spans, check_spans
from shuffler.format.manifest import Fingerprint, Manifest

KIND = "activation-shuffler/stream-state"
VERSION = 2
READS = (1, 2)

#: Settings that fix each epoch's order; a state saved under others cannot resume.
ORDER_KEYS = ("seed", "shuffle_shards", "buffer_shuffle")
#: Settings only some streams have (permute_buckets, readers/buckets.py); absent on either side reads as None.
OPTIONAL_ORDER_KEYS = ("permute_buckets",)
#: Settings that fix only how the order is shared out (readers/layout.py); they may change on resume.
LAYOUT_KEYS = ("world_size", "num_workers", "batch_size", "drop_last")


@dataclass(frozen=True, kw_only=True)
class StreamState:
    """A validated resume state, for the stream (or loader) that loads it."""

    fingerprint: Fingerprint
    """Content fingerprint of the dataset the state was saved on."""
    settings: dict
    """The ORDER_KEYS and LAYOUT_KEYS values of the stream it is for."""
    rank: int
    """The rank that saved it (ranks step in lockstep, so any rank's state resumes all)."""
    positions: tuple[tuple[int, int], ...]
    """(epoch, next batch) for each of this rank's consumers (DataLoader workers), in worker order."""
    next_worker: int = 0
    """The worker whose batch comes next in the DataLoader's round-robin (0 outside a DataLoader)."""
    base: tuple[int, tuple[Spans, ...]] = (0, ())
    """(start epoch, pending spans) of the layout the positions are in (readers/layout.py)."""

    def to_dict(self) -> dict:
        start, pending = self.base
        return {
            "kind": KIND,
            "version": VERSION,
            "dataset": self.fingerprint.to_json(),
            **self.settings,
            "rank": self.rank,
            "positions": [list(p) for p in self.positions],
            "next_worker": self.next_worker,
            "start_epoch": start,
            "pending": [[list(s) for s in spans] for spans in pending],
        }


def _int(state: dict, key: str, default=None, low: int = 0) -> int:
    v = state.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValueError(f"stream state {key}={v!r} must be an integer >= {low}")
    return v


def saved_layout(state: dict, num_rows: int) -> tuple[Layout, int]:
    """The layout a state was saved under, and its num_workers."""
    ws, nw, bs = _int(state, "world_size", low=1), _int(state, "num_workers", low=1), _int(state, "batch_size", low=1)
    if not isinstance(state.get("drop_last"), bool):
        raise ValueError(f"stream state drop_last={state.get('drop_last')!r} must be true or false")
    pending = state.get("pending", [])
    if not isinstance(pending, list):
        raise ValueError(f"stream state pending={pending!r} must list each pending epoch's row spans"[:300])
    spans = tuple(check_spans(p, num_rows, f"stream state pending epoch {i}") for i, p in enumerate(pending))
    layout = Layout(num_rows=num_rows, consumers=ws * nw, batch_size=bs, drop_last=state["drop_last"],
                    start=_int(state, "start_epoch", 0), pending=spans)
    return layout, nw


def parse_state(state: object, *, manifest: Manifest, settings: dict, url: str, epochs: int, rank: int) -> StreamState:
    """Check a state against a stream with `settings` (ORDER_KEYS and LAYOUT_KEYS) at `rank`, and return it
    translated to that stream's layout; ValueError naming the problem otherwise."""
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise ValueError(f"not a stream state (expected a dict with kind={KIND!r}, got {type(state).__name__})")
    version = state.get("version")
    if version not in READS:
        raise ValueError(f"stream state version {version!r}; this code reads versions {', '.join(map(str, READS))}")
    saved = Fingerprint.from_json(state.get("dataset"), where="stream state")
    if not manifest.names(saved):
        raise ValueError(
            f"stream state belongs to another dataset (fingerprint {saved}); {url} has fingerprint {manifest.fingerprint}"
        )
    for key in ORDER_KEYS + OPTIONAL_ORDER_KEYS:
        if state.get(key) != settings.get(key):
            raise ValueError(
                f"stream state was saved with {key}={state.get(key)!r}, this stream has {key}={settings.get(key)!r}; "
                f"resuming needs the same {key} (it fixes the order of every epoch). world_size, num_workers, "
                "batch_size and drop_last may change"
            )
    old, nw = saved_layout(state, manifest.num_rows)
    saved_rank = _int(state, "rank", 0)
    if saved_rank >= old.consumers // nw:
        raise ValueError(f"stream state rank={saved_rank} is outside its world_size={old.consumers // nw}")
    pos = state.get("positions")
    if not isinstance(pos, list) or len(pos) != nw:
        raise ValueError(f"stream state positions {pos!r} must list one [epoch, batch] per worker ({nw})"[:300])
    positions = []
    for w, p in enumerate(pos):
        if not (isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and x >= 0 for x in p)):
            raise ValueError(f"stream state position {p!r} of worker {w} must be [epoch, batch] with integers >= 0")
        e, b = p
        n = old.batches(e, saved_rank * nw + w) if e < epochs else 0
        if e > epochs or b > n or e < old.start:
            raise ValueError(
                f"stream state position epoch {e} batch {b} (worker {w}) is past this stream's end or before the "
                f"state's start_epoch {old.start} ({epochs} epochs; epoch {e} has {n} batches for this worker)"
            )
        positions.append((e, b))
    nxt = state.get("next_worker", 0)
    if not isinstance(nxt, int) or not 0 <= nxt < nw:
        raise ValueError(f"stream state next_worker={nxt!r} must be in 0..{nw - 1}")
    bs = state.get("buffer_shuffle")
    if version == 1 and bs and any(b for _, b in positions):
        e = min(e for e, b in positions if b)
        raise ValueError(
            f"stream state version 1 with buffer_shuffle={bs} stops inside epoch {e}: this version cuts "
            "buffer_shuffle's blocks from the epoch's order instead of from each consumer's rows (so that any world "
            f"size can resume), and the rows read so far cannot be told apart. Finish epoch {e} with the version "
            f"that saved the state, or restart it: load dict(state, positions=[[{e}, 0]] * {nw}, next_worker=0)"
        )

    new_nw = settings["num_workers"]
    new = Layout(num_rows=manifest.num_rows, consumers=settings["world_size"] * new_nw,
                 batch_size=settings["batch_size"], drop_last=settings["drop_last"], start=old.start,
                 pending=old.pending)
    steps = [old.steps(saved_rank * nw + w, p) for w, p in enumerate(positions)]
    if all(state[k] == settings[k] for k in LAYOUT_KEYS) and new == old:  # same layout: every consumer continues where the same-numbered worker of the saver is
        out = []
        for w, p in enumerate(positions):
            k = rank * nw + w
            out.append(p if old.steps(k, p) == steps[w] else old.position(k, steps[w], epochs))
        return StreamState(fingerprint=saved, settings=dict(settings), rank=saved_rank, positions=tuple(out),
                           next_worker=nxt, base=old.base())
    # Another layout: the rows nobody read, when every consumer of the old layout (worker w of any rank) has
    # read as many batches as the saver's worker w, are cut anew among this stream's consumers.
    start, pending = old.remainder([steps[k % nw] for k in range(old.consumers)], epochs)
    return StreamState(fingerprint=saved, settings=dict(settings), rank=saved_rank,
                       positions=((start, 0),) * new_nw, next_worker=0, base=(start, pending))
