"""Small readers for the deployment files, for tests/test_deploy*.py: a Dockerfile, compose volume and
port entries, the metric and label names in a PromQL expression, the Prometheus text exposition, and
where the checking tools are.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def find_tool(name: str) -> str | None:
    """A command on PATH, or in the venv's bin folder (where `make test` unpacks promtool and nginx)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def load_yaml(path: Path) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


# ---------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    """One ``FROM`` stage: its base image, its name, and its instructions as (KEYWORD, arguments)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]

    def arg_defaults(self) -> dict[str, str]:
        return {k: v for k, _, v in (a.partition("=") for a in self.all("ARG"))}


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages; comments dropped, continuation lines joined."""
    lines: list[str] = []
    pending = ""
    for raw in Path(path).read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages and keyword == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def exec_form(args: str) -> list[str]:
    """``["a", "b"]`` -> ``["a", "b"]``; shell form is refused (signals would not reach the server)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    _, _, cmd = stage.last("HEALTHCHECK").partition(" CMD ")
    return exec_form(cmd.strip())


def image_command(stage: Stage) -> list[str]:
    """What the container runs with no arguments: ENTRYPOINT + CMD."""
    return exec_form(stage.last("ENTRYPOINT")) + exec_form(stage.last("CMD"))


def copy_sources(stages: list[Stage]) -> list[str]:
    """Build-context paths that COPY instructions read."""
    sources = []
    for stage in stages:
        for args in stage.all("COPY"):
            if "--from=" in args:
                continue
            sources += [s for s in args.split() if not s.startswith("--")][:-1]
    return sources


# ---------------------------------------------------------------- compose


def volume_mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only), short syntax; ``${VAR:-default}`` in a source stays as written."""
    mounts = {}
    for spec in service.get("volumes", []):
        parts = re.findall(r"(?:\$\{[^}]*\}|[^:])+", spec)
        mounts[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return mounts


def container_ports(service: dict) -> list[str]:
    return [str(p).rsplit(":", 1)[-1].split("/")[0] for p in service.get("ports", [])]


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


# ---------------------------------------------------------------- PromQL and the exposition format

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan"}
_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def promql_references(expr: str) -> tuple[set[str], set[str]]:
    """Metric names and label names a PromQL expression uses.

    Strings, label matchers, grouping clauses and range selectors are read for label names and then
    removed; what is left is function and aggregation names (followed by ``(``), keywords, numbers and
    durations, and metric names.
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    labels = {name for m in re.finditer(_GROUPING, expr) for name in re.findall(r"[A-Za-z_]\w*", m.group(1))}
    expr = re.sub(_GROUPING, " ", expr)
    for m in re.finditer(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", m.group(1)))
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    metrics = set()
    for m in re.finditer(r"\d[\w.]*|([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, call = m.group(1), m.group(2)
        if name and not call and name.lower() not in PROMQL_WORDS:
            metrics.add(name)
    return metrics, labels


def parse_exposition(text: str) -> dict[str, set[str]]:
    """Series name -> label names seen, from the samples and from ``# TYPE`` lines (a declared family
    counts even before its first sample)."""
    series: dict[str, set[str]] = {}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["", "_sum", "_count"]}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            base = name.removesuffix("_total") if kind == "counter" else name
            for suffix in suffixes.get(kind, [""]):
                series.setdefault(base + suffix, set())
        elif line and not line.startswith("#"):
            m = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s", line)
            assert m, f"unparsable exposition line: {line}"
            series.setdefault(m.group(1), set()).update(re.findall(r'([A-Za-z_]\w*)="', m.group(2) or ""))
    return series
