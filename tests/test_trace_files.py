"""Reading run files: complete, incomplete, corrupt and future files."""

import h5py
import numpy as np
import pytest

from mckmpi.trace.reader import RunFileError, open_run
from mckmpi.trace.schema import SCHEMA, SCHEMA_VERSION


def _file(path, **attrs):
    with h5py.File(path, "w") as f:
        f.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "complete": True, **attrs})
        f["ranks"] = np.zeros(2, dtype=[("rank", "i4")])
    return path


def test_open_complete(tmp_path):
    with open_run(_file(tmp_path / "ok.h5")) as run:
        assert len(run.ranks) == 2 and run.datasets() == ["ranks"]


@pytest.mark.parametrize("attrs,match", [
    ({"complete": False}, "incomplete"),
    ({"schema_version": SCHEMA_VERSION + 1}, "newer than this mckmpi reads"),
    ({"schema": "other"}, "not an mckmpi run file"),
])
def test_refused(tmp_path, attrs, match):
    with pytest.raises(RunFileError, match=match):
        open_run(_file(tmp_path / "x.h5", **attrs))


def test_incomplete_allowed_on_request(tmp_path):
    with open_run(_file(tmp_path / "x.h5", complete=False), allow_incomplete=True) as run:
        assert not run.attrs["complete"]


def test_truncated_and_garbage(tmp_path):
    good = _file(tmp_path / "g.h5")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[:600])
    with pytest.raises(RunFileError, match="not a readable HDF5"):
        open_run(cut)
    junk = tmp_path / "junk.h5"
    junk.write_text("hello")
    with pytest.raises(RunFileError, match="not a readable HDF5"):
        open_run(junk)


def test_missing_dataset_is_clear(tmp_path):
    with open_run(_file(tmp_path / "ok.h5")) as run, pytest.raises(RunFileError, match="no dataset"):
        run["noise/fwq_ns"]
