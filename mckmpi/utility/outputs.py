"""Where results go: output paths checked before the work that fills them.

A run that finds out only at its end that its file cannot be written has wasted the job
(and used to leave a ``.partial`` behind). These checks ask the file system itself: the
directory is created as it will be, and a probe file is created and removed in it, which
is the only answer that holds for /proc, read-only mounts, root on NFS, ACLs and quotas.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mckmpi.errors import UsageError
from mckmpi.trace.schema import PARTIAL_SUFFIX

#: The first bytes of an HDF5 file without a user block.
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def output_dir(path: Path | str, what: str, shown: Path | str | None = None) -> Path:
    """`path` as a directory that exists and takes new files; otherwise one `UsageError`
    naming `what` (the option), `shown` (what the user gave, default `path`) and why."""
    path = Path(path)
    shown = path if shown is None else shown
    for parent in (path, *path.parents):
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise UsageError(f"{what} {shown}: {parent} is a file, not a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mckmpi-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{what} {shown}: cannot write into {path} "
                         f"({exc.strerror or exc})") from None
    return path


def run_file_target(out: Path | str, what: str = "--out") -> Path:
    """Check `--out` before the job: a directory that takes files (a name is chosen
    later), or a new ``.h5`` path (run files are never overwritten) in one."""
    out = Path(out)
    if out.suffix != ".h5":
        return output_dir(out, what)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    for taken in (out, partial):
        if taken.is_dir():
            raise UsageError(f"{what} {out}: {taken} is a directory: name a new file, or a "
                             "directory without the .h5 suffix to get a file named for the run")
        if taken.exists() or taken.is_symlink():
            raise UsageError(f"{what} {out}: {taken} exists: run files are never overwritten "
                             f"(choose another {what})")
    output_dir(out.parent, what, shown=out)
    return out


def new_hdf5_file(out: Path | str, what: str, replaces: str) -> Path:
    """A path an HDF5 file of schema `replaces` can be written to: its directory takes
    files, and it is not something else already (a directory, a file that is not HDF5, an
    HDF5 file of another schema -- a run file above all: mckmpi replaces only a file of the
    kind it is writing)."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{what} {out} is a directory: name a new file")
    if out.exists():
        try:
            with open(out, "rb") as fh:
                head = fh.read(len(HDF5_SIGNATURE))
        except OSError as exc:
            raise UsageError(f"{what} {out}: cannot read the existing file "
                             f"({exc.strerror or exc})") from None
        if head != HDF5_SIGNATURE:
            raise UsageError(f"{what} {out} exists and is not an HDF5 file: "
                             "refusing to replace it")
        schema = _schema_of(out)
        if schema != replaces:
            raise UsageError(f"{what} {out} exists and is "
                             + (f"a {schema} file" if schema else "an HDF5 file of no mckmpi schema")
                             + f", not a {replaces} file: refusing to replace it")
    output_dir(out.parent, what, shown=out)
    return out


def _schema_of(path: Path) -> str:
    """The `schema` attribute of an HDF5 file, '' when it has none or cannot be read."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("schema", "")
    except (OSError, ValueError):
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
