"""The byte format: schema, chunk codec, shard objects, manifests, array conversion (docs/format.md)."""
