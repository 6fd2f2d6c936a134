"""Summarize a py-spy profile (`py-spy record --format raw`, folded stacks) as tables.

Prints, as % of samples: the functions with the most self time, the functions with the most
inclusive time, and self time grouped by package (the first folder after site-packages, or the
standard library module), which is the quickest answer to "where does the time go".

    python bench/profile_summary.py bench/.work/gateway.folded --top 25
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

NATIVE = "(no Python frame: native code or idle)"
ROOT = str(Path(__file__).resolve().parent.parent) + "/"
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


# Packages grouped into the parts of a proxy, first match wins; anything else is "other".
COMPONENTS = (
    ("upstream HTTP client: httpx, httpcore, h11, anyio", ("httpx", "httpcore", "h11", "anyio", "sniffio")),
    ("upstream HTTP client: aiohttp", ("aiohttp", "multidict", "yarl", "aiohappyeyeballs")),
    ("retries: stamina, tenacity", ("stamina", "tenacity")),
    ("HTTP server and framework: uvicorn, litestar, fastapi, starlette", (
        "uvicorn", "litestar", "fastapi", "starlette", "msgspec", "multipart", "granian")),
    ("capture: arbitrage/capture, pyarrow", ("arbitrage/capture", "pyarrow")),
    ("metrics: prometheus_client", ("prometheus_client",)),
    ("gateway code: gateway/, arbitrage/", ("gateway", "arbitrage", "bench")),
    ("litellm, openai, pydantic", ("litellm", "openai", "pydantic", "pydantic_core", "tiktoken")),
    ("event loop: asyncio (uvloop runs in C under it)", ("stdlib/asyncio", "stdlib/concurrent", "uvloop")),
    ("other standard library", ("stdlib", "<frozen")),
    ("no Python frame: native code or idle", (NATIVE,)),
)


def component_of(package: str) -> str:
    for component, prefixes in COMPONENTS:
        if any(package == p or package.startswith((p + "/", p + " ")) for p in prefixes):
            return component
    return "other"


def read_folded(path: Path) -> list[tuple[list[str], int]]:
    """Stacks (outermost frame first) with their sample counts.

    The `process N:"command"` frame that `py-spy --subprocesses` puts first is dropped.
    """
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = [frame for frame in stack.split(";") if not frame.startswith("process ")]
            stacks.append((frames or [NATIVE], int(count)))
    return stacks


def function_name(frame: str) -> str:
    """`func (path/to/file.py:12)` -> `func (file.py)`: line numbers split one function."""
    match = FRAME.match(frame)
    if not match:
        return frame
    return f"{match['func']} ({short_file(match['file'])})"


def short_file(file: str) -> str:
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1]
    if file.startswith(ROOT):
        return file.removeprefix(ROOT)
    if "/lib/python3" in file:
        return "stdlib/" + file.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return file


def package_of(frame: str) -> str:
    """The package a frame belongs to: `litellm`, `httpx`, `stdlib/asyncio`, or the project path."""
    match = FRAME.match(frame)
    file = short_file(match["file"]) if match else frame
    parts = file.split("/")
    if parts[0] == "stdlib":
        return "stdlib/" + parts[1].removesuffix(".py") if len(parts) > 1 else "stdlib"
    if "site-packages/" in (match["file"] if match else ""):
        return parts[0].removesuffix(".py")
    return "/".join(parts[:-1]) or file


def tallies(stacks: list[tuple[list[str], int]]) -> tuple[Counter, Counter, Counter]:
    """Self time per function, inclusive time per function, self time per package."""
    own, inclusive, packages = Counter(), Counter(), Counter()
    for frames, count in stacks:
        names = [function_name(frame) for frame in frames]
        own[names[-1]] += count
        packages[package_of(frames[-1])] += count
        for name in set(names):
            inclusive[name] += count
    return own, inclusive, packages


def components(packages: Counter) -> Counter:
    grouped = Counter()
    for package, count in packages.items():
        grouped[component_of(package)] += count
    return grouped


def table(title: str, counts: Counter, total: int, top: int) -> str:
    rows = [f"| {title} | % of samples |", "| --- | ---: |"]
    rows += [f"| `{name}` | {100 * n / total:.1f} |" for name, n in counts.most_common(top)]
    return "\n".join(rows)


def summarize(path: Path, top: int) -> str:
    """The three tables as markdown."""
    stacks = read_folded(path)
    total = sum(count for _, count in stacks)
    own, inclusive, packages = tallies(stacks)
    return "\n\n".join(
        [
            f"{total} samples from `{path.name}`",
            table("self time, by component", components(packages), total, top),
            table("self time, by package", packages, total, top),
            table("self time, by function", own, total, top),
            table("inclusive time, by function", inclusive, total, top),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folded", type=Path)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    print(summarize(args.folded, args.top))


if __name__ == "__main__":
    main()
