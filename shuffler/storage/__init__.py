"""One storage contract over fsspec (atomic writes, ranged reads), and local memory maps."""
