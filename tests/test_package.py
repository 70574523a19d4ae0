"""The distribution: what the sdist and the wheel carry."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_sdist_and_wheel_carry_the_license(tmp_path):
    """python -m build: the sdist holds LICENSE, and the wheel built from it holds it under
    .dist-info/licenses/ and names it in its metadata (PEP 639)."""
    subprocess.run(  # noqa: S603 - our own interpreter, the standard build front end
        [sys.executable, "-m", "build", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        check=True,
        timeout=600,
    )
    (sdist,) = tmp_path.glob("capgate-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert any(name.endswith("/LICENSE") and name.count("/") == 1 for name in names)

    (wheel,) = tmp_path.glob("capgate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (license_file,) = (
            n for n in archive.namelist() if n.endswith(".dist-info/licenses/LICENSE")
        )
        text = archive.read(license_file).decode()
        metadata = archive.read(license_file.split("/")[0] + "/METADATA").decode()
    assert "Copyright (c) 2026 The capgate developers" in text
    assert "License-Expression: MIT" in metadata
    assert "License-File: LICENSE" in metadata
    assert "Project-URL: Source, https://github.com/capgate/capgate" in metadata


def test_license_is_mit():
    """LICENSE in the repository is the MIT licence pyproject.toml declares."""
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 The capgate developers\n")
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()
