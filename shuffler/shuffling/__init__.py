"""The two-pass shuffle: plan, map (scatter), reduce (permute), run, executors, array-job stages,
scatter-on-write, verify and the cost model (docs/shuffle.md)."""
