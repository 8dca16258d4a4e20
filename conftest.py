"""Shared pytest helpers.

Optional heavy dependencies (LIBERO, Meta-World, OpenCV, ur-rtde, h5py, ...) may be absent on a
user's laptop: tests that need them are skipped there. CI installs all of them, so under `CI` a
missing one is an error rather than a silent skip.
"""
import importlib
import os

import pytest


def need(module):
    """Import `module` or skip the calling test; under CI a missing module fails the test."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)
