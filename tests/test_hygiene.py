"""Rules about the test-suite itself (issue 13): a broken import of our own code must fail a test,
never turn it into a skip."""
from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
OWN_SKIP = re.compile(r"importorskip\(\s*[\"']npo_suite")


def test_no_test_skips_on_an_import_of_our_own_package():
    offenders = [f"{p.relative_to(TESTS)}:{n}" for p in sorted(TESTS.rglob("*.py"))
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if OWN_SKIP.search(line)]
    assert not offenders, f"pytest.importorskip on npo_suite modules (import them plainly): {offenders}"
