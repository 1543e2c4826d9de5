"""Flame graphs of the gateway's hot paths under wrk load (py-spy), and their top frames.

    python -m loadtest.bench_profile [--only token,purchase,sold_out,not_started]
                                     [--seconds 10] [--rate 200] [--connections 64]
                                     [--redis cluster|standalone] [--out DIR] [--ref REV]

Starts the stack ``loadtest.bench`` uses (a throw-away Redis, the gateway as one process,
``SECKILL_KEY_MODE=client``, the same sales), drives one path at a time with wrk and
samples the gateway process with py-spy meanwhile, twice at once: a flame graph
(``<out>/<path>.svg``, committed: the README's evidence) and the raw stacks, from which
the top frames are printed (and written to ``<out>/<path>.txt``):

- self: the share of CPU samples whose innermost Python frame is that function (time
  in C called from it, e.g. orjson or hiredis, counts as its own);
- total: the share of samples with that function anywhere on the stack;
- by area: self time by where the code lives (``gateway/http`` is the HTTP layer,
  ``gateway/admission`` and ``gateway/store`` the purchase path, aiohttp, asyncio,
  prometheus_client, ...).

Idle samples (the loop waiting in epoll) are left out: the shares are of CPU time.
Needs ``wrk`` and ``py-spy`` (``pip install py-spy``; attaching needs ptrace rights,
e.g. root or CAP_SYS_PTRACE). ``--ref REV`` profiles the gateway of that revision.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from loadtest.bench import (
    REPORTS,
    ROOT,
    Stack,
    Target,
    code_tree,
    gateway_env,
    gateway_targets,
    wrk_args,
)

PROFILED = ("bare", "token", "purchase", "sold_out", "not_started")
DEFAULT = ("token", "purchase", "sold_out", "not_started")
OUT = REPORTS / "profiles"

# Where a frame's code lives, by its file path (first match wins).
AREAS = (
    ("gateway/http/", "gateway/http (HTTP layer)"),
    ("gateway/admission/", "gateway/admission"),
    ("gateway/store/transport/", "gateway/store/transport (batcher)"),
    ("gateway/store/", "gateway/store"),
    ("gateway/", "gateway (other)"),
    ("prometheus_client/", "prometheus_client"),
    ("aiohttp/", "aiohttp"),
    ("redis/", "redis-py"),
    ("uvloop/", "uvloop"),
    ("asyncio/", "asyncio"),
    ("multidict/", "multidict"),
    ("yarl/", "yarl"),
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("needs py-spy: pip install py-spy")
    return found


def short_file(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return path.replace(str(ROOT) + "/", "")


def area_of(frame: str) -> str:
    match = _FRAME.match(frame)
    path = match["file"] if match else frame
    for needle, area in AREAS:
        if needle in path:
            return area
    return "python stdlib / other" if path.endswith(".py") else "other"


def read_raw(path: Path) -> tuple[Counter[tuple[str, ...]], int]:
    """Collapsed stacks (``frame;frame;... count``) as {stack: samples} and the total."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            frames.append(f"{match['func']} ({short_file(match['file'])})" if match else frame)
        stacks[tuple(frames)] += int(count)
    return stacks, sum(stacks.values())


def summarize(stacks: Counter[tuple[str, ...]], total: int, top: int = 15) -> str:
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    for frames, count in stacks.items():
        if not frames:
            continue
        own[frames[-1]] += count
        areas[area_of(frames[-1])] += count
        for frame in set(frames):
            anywhere[frame] += count
    lines = [f"{total} samples (CPU time only)", "", "self %  function (file)"]
    lines += [f"{100 * n / total:5.1f}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "total % function (file)"]
    lines += [f"{100 * n / total:5.1f}  {frame}" for frame, n in anywhere.most_common(top + 10)]
    lines += ["", "self % by area"]
    lines += [f"{100 * n / total:5.1f}  {area}" for area, n in areas.most_common()]
    return "\n".join(lines)


def profile(stack: Stack, target: Target, out: Path, seconds: float, rate: int,
            connections: int, native: bool) -> str:
    spy = py_spy()
    raw = stack.workdir / f"{target.name}.raw"
    svg = out / f"{target.name}.svg"
    load = subprocess.Popen(wrk_args(target, connections, seconds + 3, 1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)  # connections open, the loop busy
        common = ["record", "--pid", str(target.pid), "--duration", str(round(seconds)),
                  "--rate", str(rate)] + (["--native"] if native else [])
        recorders = [
            subprocess.Popen([spy, *common, "--format", "flamegraph", "--output", str(svg)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
            subprocess.Popen([spy, *common, "--nolineno", "--format", "raw", "--output", str(raw)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
        ]
        for recorder in recorders:
            _, err = recorder.communicate(timeout=seconds + 60)
            if recorder.returncode != 0:
                raise RuntimeError(f"py-spy failed: {err[-2000:]}")
    finally:
        wrk_out, _ = load.communicate(timeout=seconds + 60)
    line = next((ln for ln in wrk_out.splitlines() if ln.startswith("WRK_JSON ")), "")
    stacks, total = read_raw(raw)
    report = f"{target.name}: wrk {line[len('WRK_JSON '):]}\n" + summarize(stacks, total)
    (out / f"{target.name}.txt").write_text(report + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_profile",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", default=",".join(DEFAULT),
                        help=f"comma-separated paths, of: {', '.join(PROFILED)}")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--redis", choices=("cluster", "standalone"), default="cluster")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--ref", help="profile the gateway of this git revision")
    parser.add_argument("--native", action="store_true", help="C frames too (py-spy --native)")
    args = parser.parse_args(argv)
    paths = [p.strip() for p in args.only.split(",") if p.strip()]
    if set(paths) - set(PROFILED) or not shutil.which("wrk"):
        parser.error(f"paths are of {', '.join(PROFILED)}; wrk must be installed")
    py_spy()
    args.out.mkdir(parents=True, exist_ok=True)

    from devtools.redis_cluster import LocalCluster
    from devtools.redis_server import LocalRedis

    with ExitStack() as cleanup:
        workdir = Path(tempfile.mkdtemp(prefix="bench-profile-"))
        cleanup.callback(shutil.rmtree, workdir, True)
        stack = Stack(workdir)
        cleanup.callback(stack.stop)
        if args.redis == "cluster":
            redis_url = cleanup.enter_context(LocalCluster(primaries=3)).url
        else:
            redis_url = cleanup.enter_context(LocalRedis()).url
        targets: list[Target] = []
        if "bare" in paths:
            port, pid = stack.server("bare", "bare")
            targets.append(Target("bare", port, pid, "/"))
        code = code_tree(args.ref, workdir) if args.ref else ROOT
        port, pid = stack.server("gateway", "gateway", gateway_env(redis_url, args.redis), 1, code)
        targets += gateway_targets(port, pid, 1, [p for p in paths if p != "bare"], False, "",
                                   workdir)
        print(f"py-spy {args.rate} Hz x {args.seconds:g} s per path, wrk -c{args.connections}, "
              f"Redis {args.redis}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
              f"{f', gateway of {args.ref}' if args.ref else ''}", flush=True)
        for target in targets:
            print("\n" + profile(stack, target, args.out, args.seconds, args.rate,
                                 args.connections, args.native), flush=True)
    print(f"\nflame graphs: {args.out}/*.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
