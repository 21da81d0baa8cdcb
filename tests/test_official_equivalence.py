"""medlatent vs the official implementation on the same random weights (all seven configs).

Needs a reference interpreter with the official package (``pip install torch==2.14.1 torchvision==0.29.1
medvae``); set ``MEDLATENT_REF_PYTHON=/path/to/venv/bin/python``. Skipped otherwise (CI has none).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REF = os.environ.get("MEDLATENT_REF_PYTHON")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_official.py"


@pytest.mark.skipif(not REF, reason="set MEDLATENT_REF_PYTHON to a venv with the official medvae package")
def test_outputs_equal_official_within_1e4(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--ref-python", REF, "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
