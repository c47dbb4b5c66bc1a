"""Fixtures more than one package of tests uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, clean_env

#: The bundle the tests build: Debian 12's and Amazon Linux 2023's python3.11, both architectures.
BUNDLE_PYTHON = "3.11"
BUNDLE_PLATFORMS = "x86_64,aarch64"


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """`sniproxy bundle` of this checkout, made once a session. pip's own cache (under HOME)
    keeps the downloaded wheels, so a second run asks the index only whether they changed."""
    out = tmp_path_factory.mktemp("bundle") / "sniproxy-bundle.tar.gz"
    made = subprocess.run([sys.executable, "-m", "sniproxy", "bundle", "--python", BUNDLE_PYTHON,
                           "--platform", BUNDLE_PLATFORMS, "-o", str(out)],
                          capture_output=True, text=True, timeout=900, env=clean_env(), cwd=REPO)
    assert made.returncode == 0, f"sniproxy bundle failed:\n{made.stderr}"
    return out
