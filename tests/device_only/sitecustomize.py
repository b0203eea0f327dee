"""Imported at start-up by every Python whose PYTHONPATH holds this folder: the packages of distree's ``compile``
extra (and torch) cannot be imported, as on a device that ran ``pip install distree`` alone."""

import importlib.abc
import sys

BUILD_ONLY = frozenset({"scipy", "pulp", "highspy", "numba", "llvmlite", "matplotlib", "psutil", "cloudpickle",
                        "xgboost", "threadpoolctl", "torch"})


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in BUILD_ONLY:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
