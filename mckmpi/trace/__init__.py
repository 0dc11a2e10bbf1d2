"""HDF5 run files: the schema, the one tracing API, the writer and the reader.

The reader side (`schema`, `reader`) imports neither mpi4py nor the runtime, so run files
can be opened on a laptop.
"""
