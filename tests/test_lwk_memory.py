"""The LWK arena: TLSF invariants, numpy array lifetimes, boot policies and page faults."""

from __future__ import annotations

import gc
import itertools
import mmap
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mckmpi.errors import FeatureUnavailable, UsageError
from mckmpi.lwk import arena as arena_module
from mckmpi.lwk.arena import ALIGNMENT, Arena, ArenaExhausted, bind_memory
from mckmpi.lwk.tlsf import Allocator
from mckmpi.node.host import online_nodes

MiB = 1 << 20


def pages_not_mapped(address: int, length: int) -> int:
    """Pages of [address, address+length) without a present entry in this process's page
    table (/proc/self/pagemap bit 63): touching any of them takes a page fault, touching
    only mapped ones cannot. Unlike a fault counter, this sees nothing but the range."""
    page = mmap.PAGESIZE
    first, last = address // page, (address + length - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first + 1) * 8), dtype="<u8")
    return int(np.count_nonzero((entries >> np.uint64(63)) == 0))


def search_boundary(nbytes: int) -> int:
    """Smallest block size TLSF's good-fit search is guaranteed to consider for a request."""
    u = max(1, -(-nbytes // ALIGNMENT))
    s = u.bit_length() - 6
    if s > 0:
        u = ((u + (1 << s) - 1) >> s) << s
    return u * ALIGNMENT


def check_heap(alloc: Allocator, live: dict[int, int]) -> None:
    """The physical block list tiles the heap and agrees with the live handles and counters."""
    blocks = list(alloc.blocks())
    position = 0
    previous_free = False
    for offset, size, free in blocks:
        assert offset == position and size > 0 and offset % ALIGNMENT == 0
        assert not (free and previous_free), "two adjacent free blocks were not merged"
        position, previous_free = offset + size, free
    assert position == alloc.size
    used = sorted((off, size) for off, size, free in blocks if not free)
    expected = sorted((alloc.offset(h), alloc.block_size(h)) for h in live)
    assert used == expected
    for h, request in live.items():
        assert alloc.block_size(h) >= request
        assert alloc.block_size(h) - request < ALIGNMENT or request == 0
    free_sizes = [size for _, size, free in blocks if free]
    assert alloc.in_use == sum(size for _, size in used)
    assert alloc.free_blocks == len(free_sizes)
    assert alloc.largest_free() == max(free_sizes, default=0)
    assert alloc.live == len(live)


sizes = st.integers(0, 20_000) | st.integers(60, 140).map(lambda units: units * ALIGNMENT)
operations = st.lists(st.tuples(st.booleans(), sizes, st.integers(0, 10**6)), max_size=120)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_allocator_invariants_under_random_alloc_and_free(ops):
    alloc = Allocator(256 * 1024, capacity=2)  # tiny slot table: exercises growth too
    live: dict[int, int] = {}
    peak = 0
    for do_alloc, size, pick in ops:
        if do_alloc or not live:
            h = alloc.alloc(size)
            if h < 0:
                assert alloc.largest_free() < search_boundary(size)
            else:
                assert h not in live
                live[h] = size
        else:
            h = list(live)[pick % len(live)]
            alloc.free(h)
            del live[h]
        peak = max(peak, alloc.in_use)
        check_heap(alloc, live)
    assert alloc.peak == peak
    for h in list(live):
        alloc.free(h)
        del live[h]
    check_heap(alloc, live)
    assert list(alloc.blocks()) == [(0, alloc.size, True)]
    stats = alloc.stats()
    assert stats["in_use"] == 0 and stats["free_blocks"] == 1
    assert stats["largest_free"] == alloc.size and stats["fragmentation"] == 0.0


def test_good_fit_never_returns_a_smaller_block_of_the_same_class():
    alloc = Allocator(MiB)
    small = alloc.alloc(64 * ALIGNMENT)
    alloc.alloc(ALIGNMENT)  # keeps the small block from merging with the rest
    alloc.free(small)
    h = alloc.alloc(65 * ALIGNMENT)  # same class as the free 64-unit block, but larger
    assert alloc.block_size(h) == 65 * ALIGNMENT and alloc.offset(h) != 0
    assert alloc.alloc(64 * ALIGNMENT) == small


def test_allocator_rejects_double_free_and_reports_fragmentation():
    alloc = Allocator(64 * 1024)
    handles = [alloc.alloc(1024) for _ in range(8)]
    for h in handles[::2]:
        alloc.free(h)
    with pytest.raises(ValueError, match="not a live block"):
        alloc.free(handles[0])
    stats = alloc.stats()
    total_free = alloc.size - stats["in_use"]
    assert stats["fragmentation"] == pytest.approx(1 - stats["largest_free"] / total_free)
    assert 0 < stats["fragmentation"] < 1
    assert stats["allocations"] == 8 and stats["frees"] == 4


def test_arrays_are_aligned_arena_memory():
    with Arena(4 * MiB) as arena:
        arrays = [arena.empty(n, np.uint8) for n in (1, 63, 64, 65, 1000, 4096, 100_000)]
        for a in arrays:
            assert type(a) is np.ndarray
            assert a.ctypes.data % ALIGNMENT == 0
            assert arena.contains(a.ctypes.data, a.nbytes)
        spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in arrays)
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))


def test_a_view_keeps_the_block_alive_and_the_last_view_frees_it():
    with Arena(4 * MiB) as arena:
        a = arena.zeros(1000)
        view = a[10:20].reshape(2, 5)
        del a
        gc.collect()
        assert arena.stats()["in_use"] >= 8000
        view[...] = 3.0
        assert view.sum() == 30.0
        del view
        stats = arena.stats()
        assert stats["in_use"] == 0 and stats["frees"] == 1


def test_explicit_free_reuses_the_block_once():
    with Arena(4 * MiB) as arena:
        a = arena.empty(4096)
        address = a.ctypes.data
        arena.free(a)
        assert arena.stats()["in_use"] == 0
        with pytest.raises(ValueError, match="already freed"):
            arena.free(a[1:])
        b = arena.empty(4096)
        assert b.ctypes.data == address
        del a
        stats = arena.stats()
        assert stats["frees"] == 1 and stats["in_use"] == 4096 * 8
        with pytest.raises(ValueError, match="not backed by this arena"):
            arena.free(np.zeros(3))


def test_numpy_like_constructors():
    with Arena(4 * MiB) as arena:
        full = arena.full((3, 4), 7)
        assert full.dtype == np.asarray(7).dtype and (full == 7).all()
        fortran = np.asfortranarray(np.arange(12.0).reshape(3, 4))
        like = arena.empty_like(fortran)
        assert like.flags.f_contiguous and like.shape == (3, 4)
        zeros = arena.zeros_like(fortran, np.int32, "C", shape=(2, 6))
        assert zeros.dtype == np.int32 and not zeros.any()
        assert zeros.shape == (2, 6) and zeros.flags.c_contiguous
        copied = arena.asarray(fortran)
        assert arena.contains(copied.ctypes.data, copied.nbytes)
        assert np.array_equal(copied, fortran)
        assert arena.asarray(copied) is copied
        records = arena.zeros(4, dtype=[("i", "i4"), ("x", "f8")])
        assert records["x"].sum() == 0 and records.dtype.names == ("i", "x")
        vectors = arena.empty(5, dtype=("f4", (3,)))
        assert vectors.shape == (5, 3) and vectors.dtype == np.float32
        with pytest.raises(TypeError, match="Python objects"):
            arena.empty(3, dtype=object)
        with pytest.raises(ValueError, match="negative"):
            arena.empty((2, -1))


def test_exhaustion_names_arena_size_request_and_peak():
    with Arena(1 * MiB) as arena:
        a = arena.empty(512 * 1024, np.uint8)
        del a
        with pytest.raises(ArenaExhausted) as info:
            arena.empty(2 * MiB, np.uint8)
    message = str(info.value)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, UsageError)
    assert "\n" not in message
    assert "1 MiB arena" in message and "2 MiB" in message and "peak 512 KiB" in message


def test_fallback_to_linux_memory_is_counted():
    with Arena(1 * MiB, fallback="linux") as arena:
        a = arena.full(MiB // 4, 1.5)  # 2 MiB: does not fit
        assert a.sum() == 1.5 * (MiB // 4)
        assert not arena.contains(a.ctypes.data, a.nbytes)
        assert a.ctypes.data % ALIGNMENT == 0
        b = arena.empty(16)
        assert arena.contains(b.ctypes.data, b.nbytes)
        stats = arena.stats()
        assert stats["fallbacks"] == 1 and stats["fallback_bytes"] == 2 * MiB
        assert stats["allocations"] == 1
        arena.free(a)
        with pytest.raises(ValueError, match="already freed"):
            arena.free(a)


@pytest.mark.parametrize("populate", ["MADV_POPULATE_WRITE", "touch"])
def test_no_page_faults_after_boot_for_a_1_mib_array(populate, monkeypatch):
    if populate == "touch":  # an advice the kernel rejects, as kernels before 5.14 do
        monkeypatch.setattr(arena_module, "_MADV_POPULATE_WRITE", 0x7FFF)
    with Arena(8 * MiB, lock="never") as arena:  # mlock would populate the pages too
        assert arena.stats()["prefault_method"] == populate
        assert pages_not_mapped(arena.address, arena.size) == 0
        a = arena.empty(MiB // 8)
        assert pages_not_mapped(a.ctypes.data, a.nbytes) == 0
        a.fill(1.0)
        assert a.sum() == MiB // 8
    # control: the same measurement sees the pages of fresh Linux memory as not mapped
    fresh = mmap.mmap(-1, MiB)
    view = np.frombuffer(fresh, np.uint8)
    assert pages_not_mapped(view.ctypes.data, MiB) == MiB // mmap.PAGESIZE
    view[:] = 1
    assert pages_not_mapped(view.ctypes.data, MiB) == 0
    del view
    fresh.close()


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
def test_no_system_calls_on_the_allocation_path(tmp_path):
    child = ("import os\n"
             "from mckmpi.lwk.arena import Arena\n"
             "arena = Arena(8 << 20)\n"
             "arena.free(arena.empty(16))\n"
             "os.getppid()\n"
             "for _ in range(50):\n"
             "    a = arena.empty(1 << 17)\n"
             "    a.fill(1.0)\n"
             "    b = arena.zeros((64, 64), dtype='f4')\n"
             "    arena.free(b)\n"
             "    del a\n"
             "os.getppid()\n")
    log = tmp_path / "strace.log"
    subprocess.run(["strace", "-f", "-qq", "-o", str(log), sys.executable, "-c", child],
                   check=True, timeout=60, capture_output=True)
    lines = log.read_text().splitlines()
    marks = [i for i, line in enumerate(lines) if line.split(None, 1)[1].startswith("getppid(")]
    assert len(marks) == 2
    pid = lines[marks[0]].split()[0]
    calls = [line for line in lines[marks[0] + 1:marks[1]] if line.split()[0] == pid]
    assert calls == []


def test_memfd_maps_the_same_memory_again():
    with Arena(2 * MiB) as arena:
        a = arena.full(1000, 7, dtype=np.int64)
        offset = arena.offset_of(a.ctypes.data)
        other = mmap.mmap(arena.memfd, arena.size)
        view = np.frombuffer(other, np.int64, 1000, offset)
        assert (view == 7).all()
        view[5] = -1
        assert a[5] == -1
        del view
        other.close()


def test_another_process_writes_through_the_memfd():
    with Arena(2 * MiB) as arena:
        a = arena.zeros(16, dtype=np.uint8)
        offset = arena.offset_of(a.ctypes.data)
        child = ("import mmap, sys\n"
                 "fd, offset = int(sys.argv[1]), int(sys.argv[2])\n"
                 "m = mmap.mmap(fd, 0)\n"
                 "m[offset:offset + 5] = b'proxy'\n")
        subprocess.run([sys.executable, "-c", child, str(arena.memfd), str(offset)],
                       pass_fds=(arena.memfd,), check=True, timeout=30)
        assert a[:5].tobytes() == b"proxy"


@pytest.mark.parametrize("size", [0, -4096, 1.5, "1G", True, 1 << 60])
def test_bad_sizes_are_one_line_usage_errors(size):
    with pytest.raises(UsageError) as info:
        Arena(size)
    assert "\n" not in str(info.value) and "arena size" in str(info.value)


@pytest.mark.parametrize("policy", [{"hugepages": "yes"}, {"lock": "always"},
                                    {"fallback": "swap"}])
def test_bad_policies_are_usage_errors(policy):
    with pytest.raises(UsageError, match="policy must be one of"):
        Arena(MiB, **policy)


def test_stats_are_plain_values_and_say_what_boot_got():
    with Arena(2 * MiB, hugepages="never", lock="never") as arena:
        stats = arena.stats()
    assert all(type(v) in (int, float, str, bool) for v in stats.values())
    assert stats["size"] == 2 * MiB and stats["hugepages"] == "none"
    assert stats["hugepage_reason"] == "disabled by policy"
    assert stats["locked"] is False and stats["lock_reason"] == "disabled by policy"
    assert stats["prefault_ns"] > 0 and stats["numa_node"] == -1
    for key in ("in_use", "peak", "allocations", "frees", "fallbacks", "fragmentation",
                "largest_free", "free_blocks"):
        assert key in stats


def vm_locked() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmLck:"))
    return int(line.split()[1]) * 1024


def test_locked_arena_is_counted_by_the_kernel():
    before = vm_locked()
    with Arena(4 * MiB) as arena:
        if arena.stats()["locked"]:
            assert vm_locked() - before >= 4 * MiB
        else:
            assert "mlock failed" in arena.stats()["lock_reason"]
    assert vm_locked() == before


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to drop CAP_IPC_LOCK with setpriv")
def test_locking_without_permission_falls_back_or_fails_by_policy():
    child = ("import resource\n"
             "from mckmpi.errors import FeatureUnavailable\n"
             "from mckmpi.lwk.arena import Arena\n"
             "resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20))\n"
             "with Arena(8 << 20, lock='auto') as a:\n"
             "    print(a.stats()['locked'], a.stats()['lock_reason'])\n"
             "try:\n"
             "    Arena(8 << 20, lock='require')\n"
             "except FeatureUnavailable as e:\n"
             "    print('refused:', e)\n")
    caps = "-ipc_lock,-sys_resource"
    result = subprocess.run(["setpriv", "--bounding-set", caps, "--inh-caps", caps,
                             sys.executable, "-c", child],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    auto, refused = result.stdout.splitlines()
    assert auto.startswith("False mlock failed")
    assert refused.startswith("refused: arena locking required but mlock failed")


def test_required_huge_pages_without_any_is_a_clear_error():
    with Arena(2 * MiB) as probe:
        if probe.stats()["hugepages"] != "none":
            pytest.skip("this node has huge pages for the arena")
    with pytest.raises(FeatureUnavailable, match="huge pages required but unavailable"):
        Arena(4 * MiB, hugepages="require")


def test_numa_binding():
    nodes = online_nodes()
    with Arena(2 * MiB, numa_node=nodes[0]) as arena:
        stats = arena.stats()
        assert stats["numa_node"] == nodes[0]
        assert stats["numa_reason"] == ("single node" if len(nodes) == 1 else "mbind MPOL_BIND")
    with pytest.raises(UsageError, match="NUMA node 999 does not exist"):
        Arena(MiB, numa_node=999)
    region = mmap.mmap(-1, MiB)
    address = np.frombuffer(region, np.uint8).ctypes.data
    bind_memory(address, MiB, nodes[0])
    with open("/proc/self/numa_maps") as f:
        policy = next(line for line in f if line.startswith(f"{address:x} "))
    assert f"bind:{nodes[0]}" in policy
    region.close()


def mapped(address: int) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.startswith(f"{address:x}-") for line in f)


def test_close_is_idempotent_and_waits_for_live_arrays():
    arena = Arena(2 * MiB)
    fd, address = arena.memfd, arena.address
    a = arena.full(10, 2.0)
    arena.close()
    arena.close()
    assert arena.closed and arena.memfd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ValueError, match="closed"):
        arena.empty(1)
    assert mapped(address) and a.sum() == 20.0
    del a
    assert not mapped(address)
