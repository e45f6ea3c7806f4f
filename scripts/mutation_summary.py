"""Summarize a mutmut run (``make mutate``): mutants per module and status, survivors listed.

Run from the repository root after ``mutmut run``; reads ``mutants/**/*.py.meta`` (mutmut's own
results, JSON) and writes ``benchmarks/results/mutation.{md,json}``.
"""
from __future__ import annotations

import collections
import json
import platform
import subprocess
from pathlib import Path

from mutmut.stats import status_by_exit_code

OUT = Path("benchmarks/results")


def main() -> None:
    by_module: dict[str, collections.Counter] = {}
    survivors: list[str] = []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        module = str(meta.relative_to("mutants")).removesuffix(".meta")
        exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts = collections.Counter(status_by_exit_code[code] for code in exit_codes.values())
        by_module[module] = counts
        survivors += [name for name, code in exit_codes.items() if status_by_exit_code[code] == "survived"]
    if not by_module:
        raise SystemExit("no mutmut results under mutants/: run `make mutate`")
    statuses = ["killed", "timeout", "survived", "no tests", "suspicious", "not checked"]
    total = sum(by_module.values(), collections.Counter())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = [f"| {m} | {sum(c.values())} | " + " | ".join(str(c[s]) for s in statuses) + " |"
            for m, c in by_module.items()]
    rows.append(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[s]) for s in statuses) + " |")
    table = "\n".join([f"| module | mutants | {' | '.join(statuses)} |", "|---" * (len(statuses) + 2) + "|", *rows])
    text = (f"# Mutation testing (mutmut), commit {commit}, {platform.machine()}\n\n{table}\n\n"
            "killed and timeout (a mutant that makes a test hang past mutmut's limit) are caught; survived "
            "are changes no test noticed.\n\n## Survivors\n\n" + "\n".join(f"- `{s}`" for s in survivors) + "\n")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "mutation.md").write_text(text)
    (OUT / "mutation.json").write_text(json.dumps({"commit": commit, "by_module": by_module, "total": total,
                                                   "survivors": survivors}, indent=1) + "\n")
    print(table)
    print(f"{total['survived']} survivors; wrote {OUT / 'mutation.md'} and {OUT / 'mutation.json'}")


if __name__ == "__main__":
    main()
