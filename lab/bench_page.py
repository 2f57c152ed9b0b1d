"""A benchmark's printed tables as a page of docs/zoo/benchmarks/, with the command, date, load and machine.

    ../shared/tools/serial python -m benchmarks.speculative ... > runs/spec.log 2>&1   # run it alone, logged
    python -m lab.bench_page runs/spec.log --title "Self-speculative decoding" --out docs/zoo/benchmarks/speculative.md

The log is what `serial` wrote around the benchmark: its `serial: start <date>, load <1/5/15 min>: <command>` line,
the benchmark's output (markdown tables under `## ` headings) and `serial: done in <s>, exit <code>, load ...`.
Only those lines are kept, so the page's numbers are the benchmark's own printout. Several logs make one page, in
the order given. The machine is this one's CPU unless `--machine` names the one the logs were taken on.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

START = re.compile(r"serial: start (\S+), load (\S+) (\S+) (\S+): (.*)")
DONE = re.compile(r"serial: done in (\d+)s, exit (\d+), load (\S+) (\S+) (\S+)")


def this_machine() -> str:
    """The CPU's model and the widest bf16 path it has (AMX, AVX-512 bf16, or AVX2 only: fp32)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = set((re.search(r"flags\s*:\s*(.*)", text) or [None, ""])[1].split())
    kind = "AMX bf16" if "amx_bf16" in flags else "AVX-512 bf16" if "avx512_bf16" in flags else "AVX2 only (fp32)"
    return f"{model[1].strip() if model else 'unknown CPU'}, {kind}"


def section(log: Path) -> list[str]:
    """One log's part of the page: where and how it ran, then its tables."""
    lines = log.read_text(errors="replace").splitlines()
    start = next((m for line in lines if (m := START.match(line))), None)
    done = next((m for line in lines if (m := DONE.match(line))), None)
    if start is None or done is None:
        raise SystemExit(f"{log} has no `serial: start` and `serial: done` lines: run the benchmark through "
                         f"../shared/tools/serial with its output redirected to the log")
    if done[2] != "0":
        raise SystemExit(f"{log}: the benchmark exited with {done[2]}; a failed run is no figure")
    out = [f"Command: `{start[5]}`", "",
           f"Run {start[1]}, alone through `serial`, {done[1]} s; 1-minute load {start[2]} at the start and "
           f"{done[3]} at the end.", ""]
    for line in lines:
        if line.startswith("## "):
            out += ["#" + line, ""]
        elif line.startswith("|"):
            out.append(line)
        elif out[-1].startswith("|"):
            out.append("")
    return out + ([""] if out[-1] else [])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", type=Path, help="benchmark logs written through serial")
    p.add_argument("--title", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--note", default="", help="a paragraph under the title: what the tables show")
    p.add_argument("--machine", default=None, help="the CPU the logs were taken on (default: this machine's)")
    args = p.parse_args(argv)
    page = [f"# {args.title}", "", *([args.note, ""] if args.note else []),
            f"Machine: {args.machine or this_machine()}.", ""]
    for log in args.logs:
        page += section(log)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(page).rstrip() + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
