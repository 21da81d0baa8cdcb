"""Resolve every install line of the README with pip (no install) and check that the set is consistent.

Consistent means: torchvision is either not installed at all, or pinned on the same line next to torch, as the
release that matches torch (torchvision 0.N+15 for torch 2.N). PyPI's torchvision beside the CPU build of torch
breaks on import, so a line must never pull torchvision in by a transitive dependency.

Usage: python scripts/check_install_lines.py [--pip .venv/bin/pip] [README.md]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def install_lines(readme: Path) -> list[list[str]]:
    """The arguments of every ``pip install ... -e ...`` command in the README (the project's own installs)."""
    found = []
    for line in readme.read_text().splitlines():
        if "pip install" not in line or "-e" not in line:
            continue
        words = shlex.split(line.strip().strip("`"), comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word not in ("&&", ";"):
                command.append(word)
                continue
            if len(command) >= 2 and command[0].endswith("pip") and command[1] == "install" and "-e" in command:
                found.append(command[2:])
            command = []
    return found


def resolve(pip: str, args: list[str]) -> dict[str, str]:
    """Name → version of what ``pip install args`` would install into an empty environment."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *args]
        subprocess.run(cmd, cwd=ROOT, check=True)
        items = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in items}


def pinned(args: list[str], name: str) -> str | None:
    return next((a.split("==", 1)[1] for a in args if a.startswith(f"{name}==")), None)


def pair_problem(torch_v: str, vision_v: str) -> str | None:
    """Why torchvision ``vision_v`` does not belong with torch ``torch_v`` (torchvision 0.N+15 ↔ torch 2.N)."""
    torch_minor, vision_minor = re.match(r"2\.(\d+)", torch_v), re.match(r"0\.(\d+)", vision_v)
    if torch_minor and vision_minor and int(vision_minor[1]) == int(torch_minor[1]) + 15:
        return None
    return f"torchvision {vision_v} does not match torch {torch_v}"


def check(pip: str, args: list[str]) -> tuple[str, list[str]]:
    """A one-line summary and the problems of one install line.

    A line that pins torch and torchvision together is checked as a pair (resolving it would fetch the metadata
    of a multi-GB CUDA build); any other line is resolved, and must not pull torchvision in.
    """
    torch_v, vision_v = pinned(args, "torch"), pinned(args, "torchvision")
    if vision_v is not None:
        problem = pair_problem(torch_v or "?", vision_v)
        return f"torch {torch_v} + torchvision {vision_v} pinned as a pair", [problem] if problem else []
    resolved = resolve(pip, args)
    summary = f"{len(resolved)} packages, torch {resolved.get('torch', '-')}, no torchvision"
    if "torchvision" not in resolved:
        return summary, []
    return summary, [f"torchvision {resolved['torchvision']} comes in as a dependency, not pinned beside torch"]


def extras(spec: str) -> set[str]:
    return set(spec[2:-1].split(",")) if spec.endswith("]") else set()


def report(args: list[str], summary: str, found: list[str]) -> bool:
    status = "ok" if not found else "INCONSISTENT: " + "; ".join(found)
    print(f"pip install {' '.join(args)}  →  {summary}: {status}")
    return bool(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("readme", nargs="?", type=Path, default=ROOT / "README.md")
    parser.add_argument("--pip", default=str(Path(sys.executable).with_name("pip")))
    opts = parser.parse_args()
    lines = install_lines(opts.readme)
    if not lines:
        print(f"no install lines found in {opts.readme}", file=sys.stderr)
        return 1
    # Lines without a torchvision pin are resolved together, as one union of their extras per torch pin: a set that
    # pulls no torchvision in as a whole pulls none in for any of its parts, and each resolution costs minutes.
    groups: dict[tuple[str, ...], set[str]] = {}
    failed = 0
    for args in lines:
        if pinned(args, "torchvision") is not None:
            summary, found = check(opts.pip, args)
            failed += report(args, summary, found)
            continue
        rest = tuple(a for a in args if not a.startswith(".["))
        groups.setdefault(rest, set()).update(*(extras(a) for a in args if a.startswith(".[")))
    for rest, union in groups.items():
        args = [*rest, f".[{','.join(sorted(union))}]"]
        summary, found = check(opts.pip, args)
        failed += report(args, summary, found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
