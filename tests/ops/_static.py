"""Static readers for Dockerfiles, docker-compose.yml and the README (no Docker engine here)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Instruction:
    keyword: str  # upper-case: FROM, RUN, CMD, ...
    args: str     # the rest of the (continuation-joined) line
    line: int     # 1-based line where it starts


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Split a Dockerfile into stages of instructions (continuations joined, comments dropped)."""
    stages: list[Stage] = []
    pending = ""
    start = 0
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # comment lines inside a continuation are skipped
            continue
        if not pending:
            start = n
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        ins = Instruction(keyword.upper(), args.strip(), start)
        if ins.keyword == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", ins.args, re.IGNORECASE)
            assert m, f"{path}:{start}: cannot read FROM {ins.args!r}"
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        elif stages:
            stages[-1].instructions.append(ins)
        else:
            assert ins.keyword == "ARG", f"{path}:{start}: {ins.keyword} before the first FROM"
    assert not pending, f"{path}: ends inside a line continuation"
    return stages


def exec_form(ins: Instruction) -> list[str]:
    """CMD/ENTRYPOINT arguments; the JSON (exec) form is required so signals reach the process."""
    value = json.loads(ins.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), ins
    return value


def env_names(ins: Instruction) -> list[str]:
    """Variable names set by an ENV instruction (``K=V K2=V2`` form)."""
    return [tok.split("=", 1)[0] for tok in shlex.split(ins.args) if "=" in tok]


def stage_chain(stages: list[Stage], name: str | None) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first (target None = the last stage)."""
    by_name = {s.name: s for s in stages if s.name}
    stage = by_name[name] if name else stages[-1]
    chain = [stage]
    while stage.base in by_name:
        stage = by_name[stage.base]
        chain.append(stage)
    return chain


def effective(stages: list[Stage], target: str | None, keyword: str) -> Instruction | None:
    """The instruction of that kind in force for a target (the nearest stage that sets it)."""
    for stage in stage_chain(stages, target):
        found = stage.all(keyword)
        if found:
            return found[-1]
    return None


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def markdown_code_lines(text: str) -> list[str]:
    """Every line inside fenced code blocks, with shell continuations joined."""
    out: list[str] = []
    inside = False
    pending = ""
    for raw in text.splitlines():
        if raw.strip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        line = raw.strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out
