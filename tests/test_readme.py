"""The README's two set-up commands stay true: CI runs the test command verbatim, and the demo command exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [l for l in block.splitlines() if l.strip() and not l.lstrip().startswith("#")]


def test_readme_starts_with_main_job_and_test_commands():
    main_job, tests = _quick_start_commands()
    assert main_job.endswith("python -m npo_suite demo")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = _quick_start_commands()
    ci_lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests.strip() in ci_lines
