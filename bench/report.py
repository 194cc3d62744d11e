"""The run's one table, and the issue's target ratios computed from its rows.

A row is a plain dict: ``scenario``, ``target``, ``value``, ``unit`` and,
where they apply, ``loss_pct``, the CPU percentages (server, its Redis, the
load generator, everything else), ``p50_ms``/``p99_ms`` and ``flags``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "LOADGEN_LIMIT_PCT",
    "OTHER_LIMIT_PCT",
    "Ratio",
    "flags",
    "floor_lines",
    "ratios",
    "table",
]

LOADGEN_LIMIT_PCT = 90.0
"""Above this the load generator, not the server, was probably the limit."""
OTHER_LIMIT_PCT = 10.0
"""Above this other processes disturbed the measurement."""

_COLUMNS = (
    ("scenario", 12, "<"),
    ("server", 14, "<"),
    ("result", 10, ">"),
    ("unit", 12, "<"),
    ("loss %", 6, ">"),
    ("srv CPU%", 8, ">"),
    ("redis CPU%", 10, ">"),
    ("LG CPU%", 7, ">"),
    ("other%", 6, ">"),
    ("p50 ms", 7, ">"),
    ("p99 ms", 7, ">"),
    ("flags", 0, "<"),
)


def flags(row: dict[str, Any]) -> list[str]:
    """Why a row needs a second look."""
    found = list(row.get("flags", []))
    if (row.get("loadgen_cpu_pct") or 0.0) > LOADGEN_LIMIT_PCT:
        found.append("LOADGEN-BOUND")
    if (row.get("other_cpu_pct") or 0.0) > OTHER_LIMIT_PCT:
        found.append("disturbed")
    return found


def _number(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if digits == 0 and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text, one line per row, in the order given."""
    lines = [
        "  ".join(f"{name:{align}{width}}" for name, width, align in _COLUMNS).rstrip(),
    ]
    for row in rows:
        unit = row.get("unit", "")
        value = row.get("value")
        small = value is not None and abs(value) < 100
        cells = (
            row["scenario"],
            row["target"],
            _number(value, 1 if small else 0),
            unit,
            _number(row.get("loss_pct"), 2),
            _number(row.get("server_cpu_pct")),
            _number(row.get("redis_cpu_pct")) if row.get("has_redis") else "-",
            _number(row.get("loadgen_cpu_pct")),
            _number(row.get("other_cpu_pct")),
            _number(row.get("p50_ms"), 2),
            _number(row.get("p99_ms"), 2),
            ", ".join(flags(row)),
        )
        lines.append(
            "  ".join(
                f"{cell:{align}{width}}"
                for cell, (_, width, align) in zip(cells, _COLUMNS, strict=True)
            ).rstrip()
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Ratio:
    """One target of the issue, computed from two rows (or one row and a number)."""

    text: str
    value: float | None
    goal: float
    higher_is_better: bool
    suspect: bool
    """A row it is computed from was load-generator-bound or disturbed."""
    needs: tuple[tuple[str, str], ...] = ()
    """The (scenario, server) rows it is computed from."""

    @property
    def met(self) -> bool | None:
        """Whether the target is met (None: not measured)."""
        if self.value is None:
            return None
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    def line(self) -> str:
        """E.g. ``S1 1k: Herald memory / raw websockets = 2.31x (target >= 2x): met``."""
        if self.value is None:
            return f"{self.text}: not measured"
        sign = ">=" if self.higher_is_better else "<="
        verdict = "met" if self.met else "MISSED"
        if self.suspect:
            verdict += " (a row is flagged)"
        return f"{self.text} = {self.value:.2f}x (target {sign} {self.goal:g}x): {verdict}"


_NAMES = {
    "herald-memory": "Herald memory",
    "herald-redis": "Herald redis",
    "ref-websockets": "raw websockets",
    "ref-starlette": "Starlette",
    "ref-floor": "floor",
}


def _find(rows: list[dict[str, Any]], scenario: str, target: str) -> dict[str, Any] | None:
    for row in rows:
        if row["scenario"] == scenario and row["target"] == target and row.get("value") is not None:
            return row
    return None


def _ratio(
    rows: list[dict[str, Any]],
    scenario: str,
    top: str,
    bottom: str,
    goal: float,
    *,
    key: str = "value",
    bottom_key: str | None = None,
    higher_is_better: bool = True,
    label: str | None = None,
) -> Ratio:
    a, b = _find(rows, scenario, top), _find(rows, scenario, bottom)
    other = bottom_key or key
    what = f" {label}" if label else ""
    text = f"{scenario}{what}: {_NAMES[top]} / {_NAMES[bottom]}"
    value = None
    suspect = False
    if a is not None and b is not None and a.get(key) is not None and b.get(other):
        value = float(a[key]) / float(b[other])
        suspect = bool(flags(a) or flags(b))
    needs = ((scenario, top), (scenario, bottom))
    return Ratio(text, value, goal, higher_is_better, suspect, needs)


def _absolute(rows: list[dict[str, Any]], scenario: str, target: str, goal: float) -> Ratio:
    row = _find(rows, scenario, target)
    value = None if row is None else float(row["value"]) / goal
    suspect = bool(row is not None and flags(row))
    unit = "" if row is None else f" {row['unit']}"
    text = f"{scenario}: {_NAMES[target]}{unit} / {goal:,.0f}"
    return Ratio(text, value, 1.0, True, suspect, ((scenario, target),))


def ratios(rows: list[dict[str, Any]]) -> list[Ratio]:
    """The targets of the issue that this run's rows (failed ones too) bear on, in order."""
    ran = {(row["scenario"], row["target"]) for row in rows}

    def was_run(scenario: str, target: str) -> bool:
        # A failed S3 or S4 has one row, "S3", for all of its metrics.
        return (scenario, target) in ran or (scenario.split(" ")[0], target) in ran

    return [r for r in _all_ratios(rows) if all(was_run(*need) for need in r.needs)]


def _all_ratios(rows: list[dict[str, Any]]) -> list[Ratio]:
    ref = "ref-websockets"
    found = []
    for scenario, goal in (("S1 1k", 2.0), ("S1 10k", 1.4)):
        found.append(_ratio(rows, scenario, "herald-memory", ref, goal))
        found.append(_ratio(rows, scenario, "herald-redis", "herald-memory", 0.8))
    for herald in ("herald-memory", "herald-redis"):
        found.append(_ratio(rows, "S2", herald, ref, 1.5))
    # The second is not a target of the issue: the same comparison at one load for both,
    # the rate of the reference's half step (at its own half rate Herald carries more).
    latencies = (
        ("p99_ms", "p99 at half rate"),
        ("p99_at_ref_ms", "p99 at the reference's half rate"),
    )
    for key, label in latencies:
        for scenario in ("S1 1k", "S1 10k", "S2"):
            for herald in ("herald-memory", "herald-redis"):
                found.append(
                    _ratio(
                        rows,
                        scenario,
                        herald,
                        ref,
                        1.0,
                        key=key,
                        bottom_key="p99_ms",
                        higher_is_better=False,
                        label=label,
                    )
                )
    for herald in ("herald-memory", "herald-redis"):
        for scenario in ("S3 +RSS/conn", "S3 RSS/conn"):
            found.append(_ratio(rows, scenario, herald, ref, 1.0, higher_is_better=False))
        found.append(_ratio(rows, "S3 connect", herald, ref, 1.0))
    found.append(_absolute(rows, "S4 single", "herald-redis", 8000))
    found.append(_absolute(rows, "S4 batch", "herald-redis", 100_000))
    found.append(_absolute(rows, "S4 single", "herald-memory", 8000))
    found.append(_absolute(rows, "S4 batch", "herald-memory", 100_000))
    return found


def floor_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What the floor server (`ref-floor`) says about S1 and S2: not targets, a ceiling.

    The floor does nothing per delivery but a lookup and a write of bytes that
    exist already, so its figure is about the most one core reaches here; the
    lines put the raw reference and each Herald engine against it.
    """
    lines = []
    for scenario in ("S1 1k", "S1 10k", "S2"):
        floor = _find(rows, scenario, "ref-floor")
        if floor is None:
            continue
        mark = " (flagged)" if flags(floor) else ""
        raw = _find(rows, scenario, "ref-websockets")
        if raw is not None:
            lines.append(
                f"{scenario}: floor / raw websockets = {floor['value'] / raw['value']:.2f}x{mark}"
            )
        for herald in ("herald-memory", "herald-redis"):
            row = _find(rows, scenario, herald)
            if row is not None:
                share = row["value"] / floor["value"]
                lines.append(f"{scenario}: {_NAMES[herald]} / floor = {share:.2f}x{mark}")
    return lines
