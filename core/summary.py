"""`DataSummary`: the counters of one pass over a data file or source: items kept, items skipped
by reason (the reasons: trainer/data/records.py), the first message of each reason."""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class DataSummary:
    """Counters of one pass over a source: items kept and items skipped, by reason."""

    name: str = "data"
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first message seen

    def keep(self, n: int = 1) -> None:
        self.kept += n

    def skip(self, reason: str, message: str = "") -> None:
        self.skipped[reason] += 1
        if message and reason not in self.examples:
            self.examples[reason] = message

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "DataSummary") -> None:
        self.kept += other.kept
        self.skipped.update(other.skipped)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)

    def report(self) -> str:
        lines = [f"[{self.name}] kept {self.kept}, skipped {self.total_skipped}"]
        for reason, n in sorted(self.skipped.items()):
            ex = self.examples.get(reason)
            lines.append(f"  {reason}: {n}" + (f" (e.g. {ex})" if ex else ""))
        return "\n".join(lines)

    def print(self, file=None) -> None:
        print(self.report(), file=file or sys.stderr, flush=True)
