import os

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        for kind in ("kernel", "e2e", "docker"):
            if f"tests/{kind}/" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, kind))
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root (BPF, network namespaces)")
        for item in items:
            if "kernel" in item.keywords or "e2e" in item.keywords:
                item.add_marker(skip)
