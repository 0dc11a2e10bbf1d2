"""The compiled part of mckmpi: the offload proxy's per-call hot path (see pyproject.toml
for everything else). A C compiler is needed to install mckmpi; launch/setup checks."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("mckmpi.offload._fastpath", ["mckmpi/offload/_fastpath.c"],
                             extra_compile_args=["-O2", "-Wall"])])
