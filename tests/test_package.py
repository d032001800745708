"""Packaging: omnisky's subpackages map onto the top-level folders without shadowing
Hugging Face's `tokenizers`, and the console scripts are installed."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_hugging_face_tokenizers_not_shadowed_from_the_checkout():
    pytest.importorskip("tokenizers")  # Hugging Face's, pulled in by transformers
    code = "import omnisky, omnisky.tokenizers.base, tokenizers; print(tokenizers.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve().parent != (ROOT / "tokenizers").resolve()


@pytest.mark.parametrize("script", ["omnisky-shards", "omnisky-tokenize", "omnisky-generate"])
def test_console_scripts_are_installed_and_answer_help(script):
    exe = shutil.which(script, path=str(Path(sys.executable).parent))
    assert exe, f"{script} is not installed beside {sys.executable}"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage" in out.stdout.lower()
