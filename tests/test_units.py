import pytest

from mckmpi.errors import UsageError
from mckmpi.utility.units import format_cpulist, format_size, parse_cpulist, parse_cpumask, parse_size


@pytest.mark.parametrize("text,expected", [
    ("512M", 512 * 1024**2), ("2G", 2 * 1024**3), ("1.5GiB", 1536 * 1024**2), ("4096", 4096),
    ("64k", 65536), (1024, 1024),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "12X", "-5M", "0", "M", "1..2G"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        parse_size(text)


def test_format_size_round_trips():
    for n in (1024, 256 * 1024**2, 3 * 1024**3, 5 * 1024**4):
        assert parse_size(format_size(n)) == n
    assert format_size(1000) == "1000"


def test_cpulist_round_trip():
    assert parse_cpulist("0-3,8,10-11") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpulist("3,1,1") == (1, 3)
    assert format_cpulist((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"
    assert format_cpulist(()) == ""


@pytest.mark.parametrize("text", ["a", "3-1", "1-2-3", "0,,x"])
def test_cpulist_rejects(text):
    with pytest.raises(UsageError):
        parse_cpulist(text)


def test_cpumask():
    assert parse_cpumask("0x5") == (0, 2)
    assert parse_cpumask("0xF0") == (4, 5, 6, 7)
