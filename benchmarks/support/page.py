"""The one benchmarks page (docs/benchmarks.md), generated from the records in benchmarks/results/.

`make bench` writes it after the benchmarks; `python benchmarks/support/page.py` writes it from the records as they
are. A test checks that the committed page is what the records give, so figures live in the records only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"

INTRO = """# Benchmarks

Every speed, memory and quality target of the project is measured by a script under `benchmarks/` (`make bench`
runs them all) and recorded in `benchmarks/results/<name>.json`: the machine, the date, the command, the figures
(medians of several runs; a comparison with a peer is measured side by side in the same run, and its ratio
recorded) and the goals. This page is generated from those records (`python benchmarks/support/page.py`); the
figures live there, not in the prose of the other pages. Timings on a shared 2-core machine drift by 1.5x between
hours: compare ratios measured side by side, not two records' seconds.
"""


def goal_text(goal: dict) -> str:
    parts = []
    if "max" in goal:
        parts.append(f"≤ {goal['max']:g}")
    if "min" in goal:
        parts.append(f"≥ {goal['min']:g}")
    return " and ".join(parts)


def meets(value, goal: dict) -> bool | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return ("max" not in goal or value <= goal["max"]) and ("min" not in goal or value >= goal["min"])


def shown(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else value


def section(record: dict) -> str:
    goals, figures = record.get("goals", {}), record.get("figures", {})
    machine = record.get("machine", {})
    lines = [f"## {record['benchmark']}", "",
             f"`{record.get('command', '')}` on {record.get('date', '?')} "
             f"({machine.get('cpus', '?')} CPUs, Python {machine.get('python', '?')})", ""]
    if "monitor_speed" in record:  # one part measured again on its own (fatigue.py --monitor-speed-only)
        again = record["monitor_speed"]
        lines[-1:] = [f"The `monitor_1m_rows_*` figures: `{again['command']}` on {again['date']}.", ""]
    if goals:
        lines += ["| goal | target | recorded | met |", "|---|---|---|---|"]
        for name, goal in goals.items():
            value = figures.get(name)
            verdict = {True: "yes", False: "**no**", None: "—"}[meets(value, goal)]
            lines.append(f"| `{name}` | {goal_text(goal)} | {shown(value) if value is not None else '—'} | {verdict} |")
        lines.append("")
    others = {name: value for name, value in figures.items()
              if name not in goals and isinstance(value, (int, float, str)) and not isinstance(value, bool)}
    if others:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| `{name}` | {shown(value)} |" for name, value in others.items()]
        lines.append("")
    return "\n".join(lines)


def render(results: Path = RESULTS) -> str:
    records = [json.loads(path.read_text()) for path in sorted(results.glob("*.json"))]
    return INTRO + "\n" + "\n".join(section(record) for record in records)


def main(argv: list[str] | None = None) -> int:
    PAGE.write_text(render())
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
