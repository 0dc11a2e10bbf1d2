"""Reading run files: lazy, schema-checked, no MPI.

`open_run(path)` checks the schema name, version and completeness and returns a `Run`
whose datasets are read only when asked for (h5py slices), so a file with 10^8 samples
opens instantly on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mckmpi.errors import UsageError
from mckmpi.trace.schema import PARTIAL_SUFFIX, SCHEMA, SCHEMA_VERSION


class RunFileError(UsageError):
    """A file that is not a readable, complete mckmpi run file."""


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype.kind in "OS":
        return [_text(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class Run:
    """An open run file. Use as a context manager, or call `close()`."""

    path: Path
    file: h5py.File

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: _text(v) for k, v in self.file.attrs.items()}

    @property
    def provenance(self) -> dict[str, Any]:
        g = self.file.get("provenance")
        return {} if g is None else {k: _text(v) for k, v in g.attrs.items()}

    @property
    def ranks(self) -> np.ndarray:
        """The per-rank table (structured array, one row per rank)."""
        return self.file["ranks"][()]

    def datasets(self) -> list[str]:
        """Every recorded dataset path, in file order."""
        names: list[str] = []
        self.file.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
        return names

    def __contains__(self, key: str) -> bool:
        return key in self.file

    def __getitem__(self, key: str) -> h5py.Dataset:
        """A dataset, unread: slice it to load (``run['noise/fwq_ns'][0]``)."""
        try:
            return self.file[key]
        except KeyError:
            raise RunFileError(f"{self.path}: no dataset {key!r}") from None

    def units(self, key: str, field: str = "") -> str:
        attrs = self[key].attrs
        return _text(attrs.get("units" if not field else f"units:{field}", ""))

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_run(path: str | Path, allow_incomplete: bool = False) -> Run:
    """Open and check a run file; a clear `RunFileError` for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"no such run file: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise RunFileError(f"{path}: not a readable HDF5 file ({exc})") from None
    schema = _text(f.attrs.get("schema"))
    version = _text(f.attrs.get("schema_version"))
    problem = None
    if schema != SCHEMA:
        problem = f"not an mckmpi run file (schema {schema!r})"
    elif not isinstance(version, int) or version > SCHEMA_VERSION:
        problem = (f"written with schema version {version}, newer than this mckmpi reads "
                   f"({SCHEMA_VERSION}): upgrade mckmpi")
    elif version < 1:
        problem = f"schema version {version} is not supported"
    elif not f.attrs.get("complete", False) and not allow_incomplete:
        hint = " (a job stopped while writing it)" if path.name.endswith(PARTIAL_SUFFIX) else ""
        problem = f"incomplete run file{hint}"
    if problem:
        f.close()
        raise RunFileError(f"{path}: {problem}")
    return Run(path, f)
