"""Build hook: the Maglev fill loop as a small C library loaded with ctypes.

Everything else lives in pyproject.toml. The extension is optional: without a
compiler the pure-Python table builder is used (slower, same tables)."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "l4lb._maglev_fill",
            sources=["l4lb/_maglev_fill.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
