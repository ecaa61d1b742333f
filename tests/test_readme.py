"""The README's code runs as written (it is the first thing a user copies)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the explain() block on the CPU: both int8 GEMMs left to inductor (fusion="auto"), with the reason
    assert "aten._int_mm calls left: 2" in result.stdout
    assert "inductor fuses this epilogue" in result.stdout
