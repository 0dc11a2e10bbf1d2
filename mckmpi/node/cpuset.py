"""cpuset partitions of a node: IHK's `ihkosctl reserve cpu`, done with cgroups.

`reserve` creates two cpusets below a parent cgroup, `<name>/linux` (service cores) and
`<name>/lwk` (LWK cores, exclusive where the hierarchy allows), in a cgroup v1 cpuset
hierarchy or in cgroup v2 with the cpuset controller. Processes move only when asked:
`attach` moves a process mckmpi started; `system_wide=True` moves every movable task of the
parent into the Linux side, which is what takes the LWK cores away from Linux.

Every change is written to a JSON state file *before* it is made, so `release` can undo
exactly what was done from that file alone, also after the reserving process crashed. The
default state directory is /run/mckmpi: a tmpfs, so state and cgroups vanish together at
reboot.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mckmpi.errors import FeatureUnavailable, PartitionError, UsageError
from mckmpi.node import statefile
from mckmpi.utility.units import format_cpulist, parse_cpulist

SIDES = ("linux", "lwk")
_FORMAT = 1
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Errors the kernel gives for a task that may not change cpuset: kernel threads bound to
# CPUs (EINVAL), tasks of another cgroup namespace or under a deadline policy (EPERM, EBUSY).
_REFUSED = (errno.EINVAL, errno.EPERM, errno.EBUSY)


@dataclass(frozen=True)
class Hierarchy:
    """A mounted cgroup hierarchy that carries the cpuset controller."""

    version: int  # 1 or 2
    mount: Path

    @property
    def tasks_file(self) -> str:
        """The file listing a cgroup's members at the finest grain the hierarchy moves:
        threads in v1 (they may sit in different cpusets), processes in v2."""
        return "tasks" if self.version == 1 else "cgroup.procs"

    @property
    def effective_cpus_file(self) -> str:
        return "cpuset.effective_cpus" if self.version == 1 else "cpuset.cpus.effective"


class CgroupFS:
    """The kernel's cgroup files. Every access goes through one object so that a hierarchy
    this host does not offer (a v2 cpuset on a v1 host) can be emulated."""

    def read(self, path: Path) -> str:
        return path.read_text()

    def write(self, path: Path, text: str) -> None:
        # One write(2) per value: cgroup files parse each write call as a whole.
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as exc:  # name the file: write(2) errors come without one
            raise OSError(exc.errno, exc.strerror, str(path)) from None

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def exists(self, path: Path) -> bool:
        return path.exists()

    def children(self, path: Path) -> list[Path]:
        return sorted(p for p in path.iterdir() if p.is_dir())

    def cgroup_of(self, pid: int, hierarchy: Hierarchy) -> Path | None:
        """The cgroup of process `pid` in `hierarchy`, or None when the process is gone."""
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):
            return None
        for line in lines:
            hier, controllers, path = line.split(":", 2)
            if (hierarchy.version == 2 and hier == "0") or (
                    hierarchy.version == 1 and "cpuset" in controllers.split(",")):
                return hierarchy.mount / path.lstrip("/")
        return None


KERNEL = CgroupFS()


@dataclass(frozen=True)
class Reservation:
    """A reservation as its state file records it."""

    name: str
    state_file: Path
    hierarchy: Hierarchy
    parent: Path
    linux_cpus: tuple[int, ...]
    lwk_cpus: tuple[int, ...]
    system_wide: bool
    exclusive: bool
    exclusive_note: str
    moved: int
    refused: int
    complete: bool

    def path(self, side: str) -> Path:
        """The cgroup directory of one side ("linux" or "lwk")."""
        _check_side(side)
        return self.parent / self.name / side

    def describe(self) -> str:
        excl = "exclusive" if self.exclusive else f"not exclusive: {self.exclusive_note}"
        moved = (f"; system-wide: {self.moved} tasks moved to linux, {self.refused} refused"
                 if self.system_wide else "")
        state = "" if self.complete else "; INCOMPLETE: reserve stopped before finishing, run release"
        return (f"{self.name}: cgroup v{self.hierarchy.version} {self.parent / self.name}: linux cpus "
                f"{format_cpulist(self.linux_cpus)}, lwk cpus {format_cpulist(self.lwk_cpus)} "
                f"({excl}){moved}{state}")


@dataclass(frozen=True)
class ReservationStatus:
    """A reservation and what the kernel shows of it now."""

    reservation: Reservation
    tasks: dict[str, int]  # side -> tasks (v1 threads, v2 processes) in its cpuset now
    cpus: dict[str, str]  # side -> effective CPUs as the kernel reports them
    missing: tuple[str, ...]  # cgroups the state records that no longer exist

    def describe(self) -> str:
        sides = ", ".join(f"{s}: {self.tasks.get(s, 0)} tasks on cpus {self.cpus.get(s) or '-'}"
                          for s in SIDES)
        gone = f"; missing cgroups: {', '.join(self.missing)}" if self.missing else ""
        return f"{self.reservation.describe()}\n  now {sides}{gone}"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reservation"] = {k: str(v) if isinstance(v, Path) else v
                            for k, v in d["reservation"].items()}
        d["reservation"]["hierarchy"] = {"version": self.reservation.hierarchy.version,
                                         "mount": str(self.reservation.hierarchy.mount)}
        return d


@dataclass
class ReleaseSummary:
    """What `release` undid. With problems the state file is kept, so release can be rerun."""

    name: str
    state_file: Path
    found: bool = False
    restored: int = 0  # tasks moved back to the cgroup they came from
    to_parent: int = 0  # tasks without a record (children of moved ones): sent to the parent
    gone: int = 0  # recorded tasks that exited meanwhile
    removed: list[str] = field(default_factory=list)
    files_restored: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        if not self.found:
            return f"nothing reserved under '{self.name}' (no state file {self.state_file})"
        text = (f"released '{self.name}': {len(self.removed)} cgroups removed, {self.restored} tasks "
                f"moved back, {self.to_parent} to the parent, {self.gone} exited, "
                f"{len(self.files_restored)} files restored")
        if self.problems:
            text += f"; NOT undone ({self.state_file} kept): " + "; ".join(self.problems)
        return text


# --- finding the hierarchy ----------------------------------------------------------------


def detect(version: int | None = None, *, mounts: Path = Path("/proc/self/mounts"),
           fs: CgroupFS = KERNEL) -> Hierarchy:
    """The hierarchy carrying the cpuset controller (v1 first: if it is mounted, v2 cannot
    have the controller), or a clear reason why there is none."""
    if version not in (None, 1, 2):
        raise UsageError(f"cgroup version must be 1 or 2, got {version}")
    v1: Path | None = None
    v2_mounts: list[Path] = []
    for line in fs.read(mounts).splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        where = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))
        if fields[2] == "cgroup" and "cpuset" in fields[3].split(",") and v1 is None:
            v1 = where
        elif fields[2] == "cgroup2":
            v2_mounts.append(where)
    v2 = next((m for m in v2_mounts if "cpuset" in _controllers(fs, m)), None)
    if version in (None, 1) and v1 is not None:
        return Hierarchy(1, v1)
    if version in (None, 2) and v2 is not None:
        return Hierarchy(2, v2)
    raise FeatureUnavailable(_why_no_cpuset(version, v1, v2_mounts, fs))


def _controllers(fs: CgroupFS, mount: Path) -> list[str]:
    try:
        return fs.read(mount / "cgroup.controllers").split()
    except OSError:
        return []


def _why_no_cpuset(version: int | None, v1: Path | None, v2_mounts: list[Path], fs: CgroupFS) -> str:
    offers = "; ".join(f"cgroup2 at {m} offers {' '.join(_controllers(fs, m)) or 'no controller'}"
                       for m in v2_mounts)
    if version == 2 and v1 is not None:
        return (f"the cpuset controller is bound to the cgroup v1 hierarchy at {v1} (a hybrid "
                f"setup), so cgroup v2 cannot use it ({offers or 'no cgroup2 mounted'}): use cgroup "
                "v1, or boot with the unified hierarchy only (systemd.unified_cgroup_hierarchy=1)")
    if version == 2:
        return f"no cgroup2 hierarchy offers the cpuset controller ({offers or 'no cgroup2 mounted'})"
    if version == 1:
        return "no cgroup v1 hierarchy with the cpuset controller is mounted" + (
            f" ({offers})" if offers else "")
    if v2_mounts:
        return (f"no cpuset controller: {offers}, and no cgroup v1 cpuset hierarchy is mounted "
                "(on a hybrid system the controller may be bound to an unmounted v1 hierarchy)")
    return "no cgroup hierarchy is mounted (neither a v1 cpuset hierarchy nor cgroup2)"


# --- public operations --------------------------------------------------------------------


def default_state_dir() -> Path:
    """/run/mckmpi (tmpfs: it lives exactly as long as the cgroups); $XDG_RUNTIME_DIR/mckmpi
    where /run is not writable."""
    if os.access("/run", os.W_OK) or "XDG_RUNTIME_DIR" not in os.environ:
        return Path("/run/mckmpi")
    return Path(os.environ["XDG_RUNTIME_DIR"]) / "mckmpi"


def reserve(
    linux_cpus: Iterable[int],
    lwk_cpus: Iterable[int],
    *,
    name: str = "mckmpi",
    system_wide: bool = False,
    state_dir: Path | None = None,
    parent: Path | None = None,
    hierarchy: Hierarchy | None = None,
    fs: CgroupFS = KERNEL,
) -> Reservation:
    """Create the `<name>/linux` and `<name>/lwk` cpusets below `parent` (a cgroup directory,
    absolute or relative to the hierarchy's mount; default: its root). Either everything is
    set up, or everything done so far is undone before the error is raised; a crash in
    between is undone by `release`.

    In v1 a cpuset can be cpu_exclusive only below an exclusive parent, so `<name>` is made
    exclusive too: while reserved, no other cpuset beside it may use the reserved CPUs."""
    _require_root("reserve")
    _check_name(name)
    h = hierarchy or detect(fs=fs)
    top = _parent_dir(h, parent, fs)
    linux, lwk = _check_cpus(h, top, linux_cpus, lwk_cpus, fs)
    state_dir = Path(state_dir) if state_dir else default_state_dir()
    path = state_dir / f"{name}.json"
    with statefile.locked(state_dir):
        if path.exists():
            raise UsageError(f"cpuset '{name}' is already reserved (state file {path}): run "
                             f"`mckmpi partition release --name {name}` first, or reserve under "
                             "another name")
        if fs.exists(top / name):
            raise UsageError(f"cgroup {top / name} already exists and no state file ({path}) "
                             "records it: remove it or reserve under another name")
        data: dict[str, Any] = {
            "format": _FORMAT, "name": name, "hierarchy": h.version, "mount": str(h.mount),
            "parent": str(top), "linux_cpus": format_cpulist(linux), "lwk_cpus": format_cpulist(lwk),
            "system_wide": system_wide, "reserved_by": os.getpid(), "started": time.time(),
            "complete": False, "exclusive": False, "exclusive_note": "not attempted yet",
            "moved": 0, "refused": 0, "created": [], "modified": [], "moves": [],
        }
        statefile.save(path, data)
        try:
            if h.version == 1:
                _reserve_v1(data, path, h, top, linux, lwk, fs)
            else:
                _reserve_v2(data, path, h, top, linux, lwk, fs)
        except BaseException as exc:
            summary = _undo(path, data, fs)
            if isinstance(exc, OSError):
                raise UsageError(f"cannot reserve cpuset '{name}': {_oserror(exc)}"
                                 + _undo_note(summary)) from None
            if isinstance(exc, UsageError):
                raise type(exc)(f"{exc}{_undo_note(summary)}") from None
            raise
        data["complete"] = True
        statefile.save(path, data)
    return _reservation(path, data)


def attach(reservation: Reservation, side: str, pid: int, *, fs: CgroupFS = KERNEL) -> None:
    """Move process `pid` (with all its threads) into one side of the reservation; `release`
    moves it back to the cgroup it came from if it still lives there."""
    _require_root("attach")
    _check_side(side)
    h = reservation.hierarchy
    with statefile.locked(reservation.state_file.parent):
        data = _load(reservation.state_file)
        if data is None:
            raise UsageError(f"cpuset '{reservation.name}' is not reserved (no state file "
                             f"{reservation.state_file})")
        origin = fs.cgroup_of(pid, h)
        if origin is None:
            raise UsageError(f"cannot attach process {pid}: it does not exist")
        dst = reservation.path(side)
        data["moves"].append({"id": pid, "file": "cgroup.procs", "from": str(origin), "to": str(dst)})
        statefile.save(reservation.state_file, data)
        try:
            fs.write(dst / "cgroup.procs", str(pid))
        except OSError as exc:
            raise UsageError(f"cannot move process {pid} into {dst}: {_oserror(exc)}") from None


def release(name: str = "mckmpi", *, state_dir: Path | None = None,
            fs: CgroupFS = KERNEL) -> ReleaseSummary:
    """Undo what `reserve` (and `attach`) changed, from the state file alone. Idempotent:
    without a state file there is nothing to do."""
    _require_root("release")
    _check_name(name)
    state_dir = Path(state_dir) if state_dir else default_state_dir()
    path = state_dir / f"{name}.json"
    if not state_dir.is_dir():
        return ReleaseSummary(name, path)
    with statefile.locked(state_dir):
        data = _load(path)
        if data is None:
            return ReleaseSummary(name, path)
        return _undo(path, data, fs)


def load(name: str = "mckmpi", *, state_dir: Path | None = None) -> Reservation:
    """The reservation recorded under `name` (for a process other than the reserving one,
    e.g. the runner attaching its ranks)."""
    _check_name(name)
    path = (Path(state_dir) if state_dir else default_state_dir()) / f"{name}.json"
    data = _load(path)
    if data is None:
        raise UsageError(f"cpuset '{name}' is not reserved (no state file {path}): run "
                         "`mckmpi partition reserve` first")
    return _reservation(path, data)


def status(name: str | None = None, *, state_dir: Path | None = None,
           fs: CgroupFS = KERNEL) -> list[ReservationStatus]:
    """Every reservation recorded in the state directory (or only `name`), with what the
    kernel shows of it now."""
    _require_root("status")
    state_dir = Path(state_dir) if state_dir else default_state_dir()
    if not state_dir.is_dir():
        return []
    with statefile.locked(state_dir):
        paths = [state_dir / f"{name}.json"] if name else sorted(state_dir.glob("*.json"))
        found = []
        for path in paths:
            data = _load(path)
            if data is not None:
                found.append(_status(_reservation(path, data), data, fs))
        return found


# --- reserve, per hierarchy ----------------------------------------------------------------


def _reserve_v1(data: dict, path: Path, h: Hierarchy, top: Path, linux: tuple[int, ...],
                lwk: tuple[int, ...], fs: CgroupFS) -> None:
    """v1: a new cpuset holds no task until its cpus and mems are set, so configure first,
    then move."""
    mems = _read(fs, top / "cpuset.mems") or _read(fs, top / "cpuset.effective_mems")
    base = top / data["name"]
    for cg, cpus in ((base, linux + lwk), (base / "linux", linux), (base / "lwk", lwk)):
        _create(data, path, fs, cg)
        fs.write(cg / "cpuset.cpus", format_cpulist(cpus))
        fs.write(cg / "cpuset.mems", mems)
    data["exclusive"], data["exclusive_note"] = _exclusive_v1(top, base, fs)
    statefile.save(path, data)
    if data["system_wide"]:
        _move_all(data, path, h, top, base / "linux", fs)


def _exclusive_v1(top: Path, base: Path, fs: CgroupFS) -> tuple[bool, str]:
    try:
        fs.write(base / "cpuset.cpu_exclusive", "1")
    except OSError as exc:
        if exc.errno == errno.EACCES:
            return False, (f"cgroup v1 allows an exclusive cpuset only below an exclusive one, and "
                           f"{top} is not cpu_exclusive")
        if exc.errno == errno.EINVAL:
            mine = set(parse_cpulist(_read(fs, base / "cpuset.cpus")))
            others = [c.name for c in fs.children(top) if c != base
                      and mine & set(parse_cpulist(_read(fs, c / "cpuset.cpus")))]
            return False, f"other cpusets below {top} use the same CPUs: {', '.join(others) or '?'}"
        return False, f"{base}/cpuset.cpu_exclusive: {_oserror(exc)}"
    try:
        fs.write(base / "lwk" / "cpuset.cpu_exclusive", "1")
    except OSError as exc:
        fs.write(base / "cpuset.cpu_exclusive", "0")
        return False, f"{base}/lwk/cpuset.cpu_exclusive: {_oserror(exc)}"
    return True, ""


def _reserve_v2(data: dict, path: Path, h: Hierarchy, top: Path, linux: tuple[int, ...],
                lwk: tuple[int, ...], fs: CgroupFS) -> None:
    """v2: a cgroup with processes (the root excepted) may not enable controllers for its
    children, so system-wide moves come first, then the cpuset controller, then the CPUs."""
    base = top / data["name"]
    for cg in (base, base / "linux", base / "lwk"):
        _create(data, path, fs, cg)
    if data["system_wide"]:
        _move_all(data, path, h, top, base / "linux", fs)
    _enable_cpuset(data, path, fs, top, is_root=top == h.mount)
    _enable_cpuset(data, path, fs, base, is_root=False)
    for cg, cpus in ((base, linux + lwk), (base / "linux", linux), (base / "lwk", lwk)):
        fs.write(cg / "cpuset.cpus", format_cpulist(cpus))
    data["exclusive"], data["exclusive_note"] = _partition_v2(data, path, base, lwk, fs)
    statefile.save(path, data)


def _enable_cpuset(data: dict, path: Path, fs: CgroupFS, cg: Path, *, is_root: bool) -> None:
    control = cg / "cgroup.subtree_control"
    if "cpuset" in _read(fs, control).split():
        return
    data["modified"].append({"file": str(control), "added": ["cpuset"]})
    statefile.save(path, data)
    try:
        fs.write(control, "+cpuset")
    except OSError as exc:
        if exc.errno == errno.EBUSY and not is_root:
            raise UsageError(
                f"cannot enable the cpuset controller in {control}: {cg} holds processes, and cgroup "
                "v2 lets only cgroups without processes of their own (or the root) enable controllers "
                "for their children; choose a parent without processes, or system-wide mode, which "
                "moves them first") from None
        raise


def _partition_v2(data: dict, path: Path, base: Path, lwk: tuple[int, ...],
                  fs: CgroupFS) -> tuple[bool, str]:
    """Make the LWK side a partition root (its CPUs leave every other cpuset) if the kernel
    agrees. Since Linux 6.7 cpuset.cpus.exclusive lets it be a "remote" partition below
    `<name>`, which stays a member; older kernels need a partition-root parent."""
    cpus = format_cpulist(lwk)
    steps = [(base / "cpuset.cpus.exclusive", cpus), (base / "lwk" / "cpuset.cpus.exclusive", cpus)]
    steps = [s for s in steps if fs.exists(s[0])]
    steps.append((base / "lwk" / "cpuset.cpus.partition", "root"))
    first = len(data["modified"])
    note = ""
    for file, value in steps:
        data["modified"].append({"file": str(file), "before": _read(fs, file)})
        statefile.save(path, data)
        try:
            fs.write(file, value)
        except OSError as exc:
            note = f"writing {value} to {file}: {_oserror(exc)}"
            break
    else:
        state = _read(fs, base / "lwk" / "cpuset.cpus.partition")
        if state == "root":
            return True, ""
        note = f"{base}/lwk/cpuset.cpus.partition reads {state!r}"
    for entry in reversed(data["modified"][first:]):
        _restore_file(entry, fs)
    return False, f"the kernel refused an LWK partition root: {note}"


def _create(data: dict, path: Path, fs: CgroupFS, cg: Path) -> None:
    data["created"].append(str(cg))
    statefile.save(path, data)
    fs.mkdir(cg)


def _move_all(data: dict, path: Path, h: Hierarchy, src: Path, dst: Path, fs: CgroupFS) -> None:
    """Move every movable task of `src` to `dst`, recording each before it moves. Passes
    repeat while new tasks appear (forks during the move)."""
    unit = h.tasks_file
    refused: set[int] = set()
    for _ in range(5):
        ids = [i for i in _members(fs, src / unit) if i not in refused]
        if not ids:
            break
        data["moves"].extend({"id": i, "file": unit, "from": str(src), "to": str(dst)} for i in ids)
        statefile.save(path, data)
        failed: set[int] = set()
        for i in ids:
            try:
                fs.write(dst / unit, str(i))
                data["moved"] += 1
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    failed.add(i)
                elif exc.errno in _REFUSED:
                    refused.add(i)
                    failed.add(i)
                else:
                    raise
        data["moves"] = [m for m in data["moves"] if m["to"] != str(dst) or m["id"] not in failed]
        data["refused"] = len(refused)
        statefile.save(path, data)


# --- release -------------------------------------------------------------------------------


def _undo(path: Path, data: dict, fs: CgroupFS) -> ReleaseSummary:
    """Undo in the order the kernel needs: files first (a v2 partition before the controller
    under it; controllers before tasks return to a parent that had none), then tasks, then
    the cgroups, deepest first."""
    s = ReleaseSummary(data["name"], path, found=True)
    h = Hierarchy(data["hierarchy"], Path(data["mount"]))
    top = Path(data["parent"])
    ours = [Path(p) for p in data["created"]]
    for entry in reversed(data["modified"]):
        try:
            if _restore_file(entry, fs):
                s.files_restored.append(entry["file"])
        except OSError as exc:
            s.problems.append(f"restoring {entry['file']}: {_oserror(exc)}")
    current: dict[tuple[str, str], set[int]] = {}
    for m in reversed(data["moves"]):
        to, unit = Path(m["to"]), m["file"]
        key = (str(to), unit)
        if key not in current:
            current[key] = set(_members(fs, to / unit)) if fs.exists(to) else set()
        if m["id"] not in current[key]:
            continue  # never moved, or already left our cpuset: not ours to move
        current[key].discard(m["id"])
        origin = Path(m["from"])
        dest = origin if fs.exists(origin / unit) else top
        outcome = _move(fs, dest / unit, m["id"], s)
        if outcome == "moved":
            s.restored += 1
    for attempt in range(3):
        for cg in reversed(ours):
            if fs.exists(cg):
                for i in _members(fs, cg / h.tasks_file):
                    if _move(fs, top / h.tasks_file, i, s) == "moved":
                        s.to_parent += 1
        left = []
        for cg in reversed(ours):
            try:
                fs.rmdir(cg)
                s.removed.append(str(cg))
            except FileNotFoundError:
                pass
            except OSError as exc:
                left.append(f"removing {cg}: {_oserror(exc)}")
        if not left:
            break
        time.sleep(0.05 * (attempt + 1))
    s.problems.extend(left)
    if s.ok:
        statefile.remove(path)
    return s


def _restore_file(entry: dict, fs: CgroupFS) -> bool:
    """Put one recorded file back; False when there was nothing to do (its cgroup is gone,
    or the change was recorded but never made)."""
    file = Path(entry["file"])
    if not fs.exists(file):
        return False
    if "added" in entry:
        present = _read(fs, file).split()
        tokens = [f"-{c}" for c in entry["added"] if c in present]
        if not tokens:
            return False
        fs.write(file, " ".join(tokens))
        return True
    if _read(fs, file) == entry["before"]:
        return False
    fs.write(file, entry["before"] + "\n")
    return True


def _move(fs: CgroupFS, procs: Path, task: int, s: ReleaseSummary) -> str:
    try:
        fs.write(procs, str(task))
        return "moved"
    except ProcessLookupError:
        s.gone += 1
        return "gone"
    except OSError as exc:
        s.problems.append(f"moving task {task} to {procs.parent}: {_oserror(exc)}")
        return "failed"


# --- state file ----------------------------------------------------------------------------


def _load(path: Path) -> dict | None:
    return statefile.load(path, "cpuset", _FORMAT,
                          "inspect the cgroups it names and remove it by hand")


def _reservation(path: Path, data: dict) -> Reservation:
    return Reservation(
        name=data["name"], state_file=path, hierarchy=Hierarchy(data["hierarchy"], Path(data["mount"])),
        parent=Path(data["parent"]), linux_cpus=parse_cpulist(data["linux_cpus"]),
        lwk_cpus=parse_cpulist(data["lwk_cpus"]), system_wide=data["system_wide"],
        exclusive=data["exclusive"], exclusive_note=data["exclusive_note"], moved=data["moved"],
        refused=data["refused"], complete=data["complete"],
    )


def _status(r: Reservation, data: dict, fs: CgroupFS) -> ReservationStatus:
    tasks, cpus = {}, {}
    for side in SIDES:
        cg = r.path(side)
        if fs.exists(cg):
            tasks[side] = len(_members(fs, cg / r.hierarchy.tasks_file))
            f = cg / r.hierarchy.effective_cpus_file
            cpus[side] = _read(fs, f) if fs.exists(f) else ""
    missing = tuple(p for p in data["created"] if not fs.exists(Path(p)))
    return ReservationStatus(r, tasks, cpus, missing)


# --- checks and small helpers --------------------------------------------------------------


def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"mckmpi partition {action} needs root: cgroup cpuset files are writable "
                         "by root only")


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise UsageError(f"not a cpuset name: {name!r} (use letters, digits, '_', '.', '-')")


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise UsageError(f"side must be one of {', '.join(SIDES)}, got {side!r}")


def _parent_dir(h: Hierarchy, parent: Path | None, fs: CgroupFS) -> Path:
    top = h.mount if parent is None else h.mount / parent  # an absolute `parent` replaces mount
    top = Path(os.path.normpath(top))
    if top != h.mount and h.mount not in top.parents:
        raise UsageError(f"parent cgroup {top} is not inside the cgroup hierarchy at {h.mount}")
    if not fs.exists(top / "cgroup.procs"):
        raise UsageError(f"parent cgroup {top} does not exist")
    if h.version == 2 and "cpuset" not in _read(fs, top / "cgroup.controllers").split():
        raise FeatureUnavailable(f"the cpuset controller is not available in {top}: its parent's "
                                 "cgroup.subtree_control lacks cpuset; enable it there or choose "
                                 "another parent")
    return top


def _check_cpus(h: Hierarchy, top: Path, linux_cpus: Iterable[int], lwk_cpus: Iterable[int],
                fs: CgroupFS) -> tuple[tuple[int, ...], tuple[int, ...]]:
    linux, lwk = tuple(sorted(set(linux_cpus))), tuple(sorted(set(lwk_cpus)))
    if not linux:
        raise PartitionError("the Linux side of a cpuset reservation needs at least one CPU")
    if not lwk:
        raise PartitionError("no LWK CPUs to reserve")
    overlap = set(linux) & set(lwk)
    if overlap:
        raise PartitionError(f"Linux and LWK CPUs overlap on CPU {format_cpulist(overlap)}")
    allowed = _effective_cpus(h, top, fs)
    outside = sorted(set(linux + lwk) - set(allowed))
    if outside:
        raise PartitionError(f"CPU {format_cpulist(outside)} is not in the cpuset of {top} "
                             f"({format_cpulist(allowed) or 'empty'})")
    return linux, lwk


def _effective_cpus(h: Hierarchy, top: Path, fs: CgroupFS) -> tuple[int, ...]:
    # A v2 cgroup whose parent does not distribute cpuset has no cpuset files: it uses
    # the CPUs of its nearest ancestor that has them.
    for d in (top, *top.parents):
        f = d / h.effective_cpus_file
        if fs.exists(f):
            return parse_cpulist(_read(fs, f))
        if d == h.mount:
            break
    return ()


def _read(fs: CgroupFS, path: Path) -> str:
    return fs.read(path).strip()


def _members(fs: CgroupFS, path: Path) -> list[int]:
    try:
        return [int(x) for x in fs.read(path).split()]
    except FileNotFoundError:
        return []


def _oserror(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return where + (os.strerror(exc.errno) if exc.errno else str(exc))


def _undo_note(summary: ReleaseSummary) -> str:
    if summary.ok:
        return " (everything reserve had changed was undone)"
    return f"; undoing it failed, run `mckmpi partition release --name {summary.name}`: " + "; ".join(
        summary.problems)
