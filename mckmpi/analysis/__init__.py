"""Post-processing of run files. Never imports mpi4py, the offload or the LWK runtime, so
results open on a laptop.

- `stats`: exact percentiles of samples streamed in blocks (bounded memory)
- `noise`, `offload`, `counters`, `app`: the statistics of one concern each
- `summary`: everything about one run, computed once; `report`: its text tables
- `compare`: two runs side by side; `scaling` and `study`: many runs, speedup, efficiency
- `simulate`: noise amplification at 10^3..10^6 ranks; `plots`: every PNG
"""
