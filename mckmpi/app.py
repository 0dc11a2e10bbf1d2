"""What the app of a rank is: a Python file, a Python module, an MPI executable, or any
other executable, found before MPI starts so a missing or wrong app is a usage error on
every rank; MPI executables are recognised by reading the ELF's needed libraries.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from mckmpi.errors import UsageError

SHT_DYNAMIC, DT_NEEDED = 6, 1  # ELF: the dynamic section; its "needs this library" entry

@dataclass(frozen=True)
class App:
    """What to run: a Python file, a Python module (-m), an MPI executable or any other
    executable."""

    kind: str  # "file" | "module" | "mpi-binary" | "binary"
    target: str
    args: tuple[str, ...]

    @property
    def name(self) -> str:
        return Path(self.target).stem if self.kind != "module" else self.target.rsplit(".", 1)[-1]


def resolve_app(argv: list[str], module: str | None) -> App:
    """Classify the command after ``--``; a missing, unreadable or non-executable app or a
    module that cannot be found is a user error, found before MPI on every rank.

    A target with a slash is kept as typed (``./prog`` stays ``./prog``: without its
    ``./`` the child would be looked up on PATH); a bare name is looked up on PATH now.
    """
    if module:
        return App("module", find_module(module), tuple(argv))
    if not argv:
        raise UsageError("nothing to run: give an app after --, e.g. mckmpi run -- apps/fwq.py")
    target, args = argv[0], tuple(argv[1:])
    path = Path(target)
    if path.is_dir():
        raise UsageError(f"app is a directory, not a file: {target}")
    if "/" not in target and path.suffix != ".py":
        found = shutil.which(target)
        if found is None:
            raise UsageError(f"app not found on PATH: {target}")
        target, path = found, Path(found)
    if path.is_dir():
        raise UsageError(f"app is a directory, not a file: {target}")
    if not path.is_file():
        raise UsageError(f"app not found: {target}")
    first = _first_line(path, target)
    if path.suffix == ".py" or (first.startswith(b"#!") and b"python" in first):
        return App("file", target, args)
    if not os.access(path, os.X_OK):
        raise UsageError(f"app is not executable: {target}")
    return App("mpi-binary" if links_mpi(path) else "binary", target, args)


def find_module(name: str) -> str:
    """`name` if Python can run it with ``-m``, found without importing anything (a
    package's ``__init__`` may import mpi4py, which must not start MPI yet)."""
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        raise UsageError(f"not a module name: {name!r}")
    spec, search = None, None
    for i, part in enumerate(parts):
        try:
            spec = (importlib.util.find_spec(part) if i == 0 else
                    importlib.machinery.PathFinder.find_spec(part, search))
        except (ImportError, ValueError, OSError) as exc:
            raise UsageError(f"module {name} cannot be found ({exc})") from None
        if spec is None:
            raise UsageError(f"no module named {'.'.join(parts[:i + 1])!r} (for -m {name})")
        search = spec.submodule_search_locations
        if search is None and i < len(parts) - 1:
            raise UsageError(f"-m {name}: {'.'.join(parts[:i + 1])} is not a package")
    if spec is not None and spec.submodule_search_locations is not None:
        if importlib.machinery.PathFinder.find_spec("__main__", spec.submodule_search_locations) is None:
            raise UsageError(f"-m {name}: a package without __main__, cannot be run")
    return name


def _first_line(path: Path, target: str) -> bytes:
    """The file's first line (at most 256 bytes); an unreadable app is a usage error now,
    not a traceback after MPI init."""
    try:
        with open(path, "rb") as fh:
            return fh.readline(256)
    except OSError as exc:
        raise UsageError(f"cannot read app {target}: {exc.strerror or exc}") from None


def links_mpi(path: Path) -> bool:
    """Whether an executable is an MPI program: a library it needs is libmpi (a statically
    linked MPI program is not recognised)."""
    return any(name.startswith("libmpi") for name in needed_libraries(path))


def needed_libraries(path: Path) -> list[str]:
    """The DT_NEEDED entries of a 64-bit ELF file's dynamic section ([] for anything else),
    read from its section headers without reading the whole file."""
    with open(path, "rb") as fh:
        header = fh.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
            return []
        order = "<" if header[5] == 1 else ">"
        (shoff,) = struct.unpack_from(order + "Q", header, 0x28)
        shentsize, shnum = struct.unpack_from(order + "HH", header, 0x3A)
        fh.seek(shoff)
        table = fh.read(shentsize * shnum)
        if shentsize < 64 or len(table) < shentsize * shnum:
            return []
        # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize
        sections = [struct.unpack_from(order + "IIQQQQIIQQ", table, i * shentsize)
                    for i in range(shnum)]

        def read(section: tuple[int, ...]) -> bytes:
            fh.seek(section[4])
            return fh.read(section[5])

        for section in sections:
            if section[1] == SHT_DYNAMIC and section[6] < shnum:
                strings, dynamic = read(sections[section[6]]), read(section)
                entries = struct.iter_unpack(order + "qQ", dynamic[:len(dynamic) // 16 * 16])
                return [strings[value:strings.find(b"\0", value)].decode(errors="replace")
                        for tag, value in entries if tag == DT_NEEDED and value < len(strings)]
    return []
