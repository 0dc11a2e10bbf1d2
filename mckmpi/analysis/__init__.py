"""Post-processing of run files. Never imports mpi4py, the offload or the LWK runtime."""
