import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT, timeout=600):
    """Run one of the project's command-line entry points; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(result, *fragments):
    """A command-line run that ended as a user error should: exit 2, one `error: ...` line, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    for fragment in fragments:
        assert fragment in line, line


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A few hundred KB of varied text documents, made here so tests need no download."""
    root = tmp_path_factory.mktemp("corpus")
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
             "every jolly vexing box of frozen pizza").split()
    for d in range(40):
        lines = [" ".join(words[(d * 7 + i * 3 + j) % len(words)] for j in range(5 + (i + d) % 9)) + "."
                 for i in range(60)]
        (root / f"doc{d:02d}.txt").write_text("\n".join(lines) + "\n")
    return root
