"""The default test run must include every test folder: pytest skips folders named like build
outputs (``dist``, ``build``) unless ``norecursedirs`` says otherwise."""

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_default_collection_includes_every_test_folder():
    listing = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                             cwd=TESTS.parent, capture_output=True, text=True, timeout=300).stdout
    collected = {line.split("/")[1] for line in listing.splitlines() if line.startswith("tests/") and line.count("/") > 1}
    folders = {path.parent.name for path in TESTS.glob("*/test_*.py")}
    assert folders and folders <= collected, f"not collected: {sorted(folders - collected)}"
