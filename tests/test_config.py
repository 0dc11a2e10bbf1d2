import argparse

import pytest

from mckmpi import config
from mckmpi.errors import UsageError


def _parse(argv):
    p = argparse.ArgumentParser()
    config.add_arguments(p, "partition", "run")
    return p.parse_args(argv)


def test_precedence_cli_env_file_default(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('[partition]\nmem = "1G"\nvnodes = 3\nlinux_cores = "2"\n[run]\nout = "x"\n')
    env = {"MCKMPI_VNODES": "2", "MCKMPI_LINUX_CORES": "0"}
    s = config.resolve(_parse(["--linux-cores", "1"]), "partition", "run", env=env, file=f)
    assert s.linux_cores == "1" and s.origins["linux_cores"] == "command line"
    assert s.vnodes == 2 and s.origins["vnodes"] == "MCKMPI_VNODES"
    assert s.mem == 1024**3 and "m.toml" in s.origins["mem"]
    assert s.out == "x"
    assert s.mode == "linux" and s.origins["mode"] == "default"


def test_flag_from_env_and_cli():
    assert config.resolve(_parse([]), "partition", env={"MCKMPI_OVERSUBSCRIBE": "yes"}, file=None).oversubscribe
    assert config.resolve(_parse(["--oversubscribe"]), "partition", env={}, file=None).oversubscribe
    with pytest.raises(UsageError, match="boolean"):
        config.resolve(_parse([]), "partition", env={"MCKMPI_OVERSUBSCRIBE": "maybe"}, file=None)


def test_bad_values_name_their_origin(tmp_path):
    with pytest.raises(UsageError, match="MCKMPI_MODE"):
        config.resolve(_parse([]), "partition", env={"MCKMPI_MODE": "fast"}, file=None)
    with pytest.raises(UsageError, match="not a size"):
        config.resolve(_parse(["--mem", "lots"]), "partition", env={}, file=None)
    bad = tmp_path / "bad.toml"
    bad.write_text("[partition\n")
    with pytest.raises(UsageError, match="TOML"):
        config.resolve(None, "partition", env={}, file=bad)


def test_missing_config_file_named_by_env():
    with pytest.raises(UsageError, match="MCKMPI_CONFIG"):
        config.config_file({"MCKMPI_CONFIG": "/nonexistent/m.toml"})


def test_to_env_round_trip():
    s = config.resolve(_parse(["--mem", "512M", "--oversubscribe", "--vnodes", "2"]), "partition", env={}, file=None)
    again = config.resolve(None, "partition", env=config.to_env(s), file=None)
    assert again.values == s.values
