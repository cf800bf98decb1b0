"""A Grafana dashboard's PromQL as Grafana would send it to Prometheus.

Every panel target and every template-variable query of a dashboard JSON, with template
variables and the built-in macros interpolated the way Grafana's Prometheus data source does
it (templateSrv + `interpolateQueryExpr`, `$__rate_interval` from the data source's scrape
interval). Only what a test needs: an unknown variable, format or variable feature raises
rather than leaving text Grafana would have replaced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

ALL = "$__all"  # Grafana's value for a variable's "All" option

# templateSrv's variable syntax: $name, [[name]], [[name:format]], ${name}, ${name:format}
VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?::([^}]+))?\}")
# What is left after interpolation and still looks like a variable ($1 in label_replace is not).
LEFTOVER = re.compile(r"\$[A-Za-z_]\w*|\$\{[^}]*\}|\[\[[^\]]*\]\]")
REGEX_META = re.compile(r"[$^*{}\[\]+?.()|]")
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<match>.+),\s*)?(?P<label>\w+)\s*\)$", re.S)
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


class UnsupportedQuery(ValueError):
    """A dashboard uses something this helper (and so the test) doesn't interpret."""


@dataclass(frozen=True)
class Target:
    panel: str  # the panel's title
    ref_id: str
    expr: str
    legend: str
    instant: bool  # Grafana sends /api/v1/query instead of /api/v1/query_range

    @property
    def legend_labels(self) -> set[str]:
        return set(LEGEND_LABEL.findall(self.legend))


@dataclass(frozen=True)
class Variable:
    name: str
    query: str
    multi: bool
    include_all: bool
    all_value: str | None


@dataclass(frozen=True)
class Window:
    """A dashboard time range as Grafana turns it into query parameters and macros."""

    start: float  # unix seconds
    end: float
    scrape_interval_s: int  # the data source's scrape interval ("timeInterval")
    max_data_points: int = 1000

    @property
    def step_s(self) -> int:
        """$__interval: the range over the panel's points, never under the scrape interval."""
        return max(self.scrape_interval_s, round((self.end - self.start) / self.max_data_points))

    @property
    def rate_interval_s(self) -> int:
        """Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval)."""
        return max(self.step_s + self.scrape_interval_s, 4 * self.scrape_interval_s)

    @property
    def range_s(self) -> int:
        return round(self.end - self.start)

    def macros(self) -> dict[str, str]:
        return {
            "__interval": f"{self.step_s}s", "__interval_ms": str(self.step_s * 1000),
            "__rate_interval": f"{self.rate_interval_s}s",
            "__rate_interval_ms": str(self.rate_interval_s * 1000),
            "__range": f"{self.range_s}s", "__range_s": str(self.range_s),
            "__range_ms": str(self.range_s * 1000),
        }

    def aligned(self) -> tuple[float, float]:
        """Grafana aligns a range query's start and end to its step."""
        step = self.step_s
        return (self.start // step) * step, -(-self.end // step) * step


def panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panels(panel)  # a collapsed row keeps its panels inside it


def targets(dashboard: dict) -> list[Target]:
    return [Target(panel["title"], t["refId"], t["expr"], t.get("legendFormat", ""),
                   bool(t.get("instant")) and not t.get("range", False))
            for panel in panels(dashboard) for t in panel.get("targets", []) if not t.get("hide")]


def variables(dashboard: dict) -> list[Variable]:
    out = []
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            raise UnsupportedQuery(f"variable {v['name']}: type {v.get('type')!r}")
        if v.get("regex"):
            raise UnsupportedQuery(f"variable {v['name']}: a regex filter on its values")
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        out.append(Variable(v["name"], query, bool(v.get("multi")), bool(v.get("includeAll")),
                            v.get("allValue") or None))
    return out


def _regular_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\\\'")


def _regex_escape(value: str) -> str:
    """prometheusSpecialRegexEscape: the value matched literally inside a PromQL regex string."""
    return REGEX_META.sub(lambda m: "\\\\" + m.group(0), value.replace("\\", "\\\\\\\\"))


def _format(variable: Variable, value: str | list[str], options: list[str], fmt: str | None) -> str:
    if value == ALL or value == [ALL]:
        if variable.all_value is not None and fmt not in ("text", "queryparam"):
            return variable.all_value  # a custom all value is used as written, never escaped
        value = options
    values = [value] if isinstance(value, str) else list(value)
    if fmt is None:  # the Prometheus data source's own formatting
        if not variable.multi and not variable.include_all:
            return _regular_escape(values[0])
        escaped = [_regex_escape(v) for v in values]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
    if fmt == "regex":
        escaped = [re.escape(v) for v in values]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
    if fmt == "pipe":
        return "|".join(values)
    if fmt in ("raw", "csv"):
        return ",".join(values)
    raise UnsupportedQuery(f"variable format {fmt!r}")


def interpolate(text: str, variables: list[Variable], selected: dict[str, str | list[str]],
                options: dict[str, list[str]], window: Window) -> str:
    """`text` with every variable and macro replaced; raises on one that stays unresolved."""
    by_name = {v.name: v for v in variables}
    macros = window.macros()

    def replace(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        fmt = m.group(3) or m.group(5)
        if name in macros:
            return macros[name]
        if name in by_name:
            return _format(by_name[name], selected[name], options.get(name, []), fmt)
        return m.group(0)  # not a variable (Grafana leaves it too): caught below if it looks like one

    out = VARIABLE.sub(replace, text)
    leftover = LEFTOVER.findall(out)
    if leftover:
        raise UnsupportedQuery(f"unresolved {leftover} in {text!r}")
    return out


def label_values_query(query: str) -> tuple[str | None, str]:
    """label_values([series selector,] label) -> (selector or None, label)."""
    m = LABEL_VALUES.match(query.strip())
    if m is None:
        raise UnsupportedQuery(f"variable query {query!r} (only label_values is interpreted)")
    return (m.group("match").strip() if m.group("match") else None), m.group("label")
