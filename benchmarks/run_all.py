"""Run every benchmark that applies to this device and render one table of ratios.

    python benchmarks/run_all.py [--only forward_overhead,patching] [--quick]

Each script in ``SCRIPTS`` is run in its own process with ``--json FILE``; its JSON carries a ``summary``
list of rows ``{"row", "value", "anchor", "ratio", "goal"}`` -- the ratio is against an anchor measured in
the same run (mlx-lm forward, TransformerLens patching, a straightforward MLX SAE step, sparsify). This
writes ``benchmarks/results/<device>-<date>.json`` (everything) and ``benchmarks/results/<device>-latest.md``
(the table, each row with the command that produced it), which the README copies.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, extra args, devices it applies to, extra args for --quick)
SCRIPTS = {
    "forward_overhead": ("forward_overhead.py", [], {"cpu", "cuda", "metal"}, ["--repeats", "8"]),
    "patching": ("patching.py", [], {"cpu"}, ["--configs", "small", "--repeats", "2"]),
    "sae_train": ("sae_train.py", [], {"cpu", "cuda", "metal"}, []),
    "sae_kernels": ("sae_kernels.py", [], {"cuda", "metal"}, []),
    # data-parallel scaling: only where several GPUs share the host ("cuda-multi")
    "sae_distributed": ("sae_distributed.py", ["-n", "2"], {"cuda-multi"}, ["--shapes", "S1"]),
}


def _gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def device_name() -> str:
    import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
    import mlx.core as mx

    if mx.cuda.is_available():
        return "cuda-multi" if _gpu_count() > 1 else "cuda"
    if mx.metal.is_available():
        return "metal"
    return "cpu"


def render(rows: list[dict], device: str, date: str) -> str:
    lines = [f"Device: {device} ({date}). Ratios are against the anchor measured in the same run.", "",
             "| benchmark | measurement | hooked_mlx | anchor | ratio | goal | command |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("ratio")
        ratio_s = f"{ratio:.2f}x" if isinstance(ratio, (int, float)) else str(ratio or "")
        lines.append(f"| {r['benchmark']} | {r['row']} | {r.get('value', '')} | {r.get('anchor', '')} | {ratio_s} | "
                     f"{r.get('goal') or ''} | `{r['command']}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated benchmark names (default: all that apply)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats / smaller configurations")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    device = device_name()
    date = dt.date.today().isoformat()
    wanted = [n for n in args.only.split(",") if n] or list(SCRIPTS)
    unknown = [n for n in wanted if n not in SCRIPTS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(SCRIPTS)}")
    results, table = {}, []
    for name in wanted:
        script, extra, devices, quick = SCRIPTS[name]
        if device not in devices and not (device == "cuda-multi" and "cuda" in devices):
            print(f"-- {name}: does not apply to {device}, skipped")
            continue
        if not (HERE / script).exists():
            print(f"-- {name}: {script} missing, skipped")
            continue
        cmd_args = extra + (quick if args.quick else [])
        command = " ".join(["python", f"benchmarks/{script}", *cmd_args])
        print(f"-- {name}: {command}", flush=True)
        with tempfile.TemporaryDirectory() as d:
            out_json = Path(d) / "out.json"
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, str(HERE / script), *cmd_args, "--json", str(out_json)],
                                  cwd=HERE.parent, text=True, capture_output=True)
            secs = time.perf_counter() - t
            print(proc.stdout, end="")
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                results[name] = {"error": proc.stderr[-3000:], "returncode": proc.returncode, "command": command}
                continue
            data = json.loads(out_json.read_text()) if out_json.exists() else {}
        data["command"] = command
        data["seconds"] = round(secs, 1)
        results[name] = data
        for row in data.get("summary", []):
            table.append({"benchmark": name, "command": command, **row})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / f"{device}-{date}.json"
    if jpath.exists():  # a partial run (--only) updates the day's results instead of replacing them
        previous = json.loads(jpath.read_text()).get("results", {})
        results = {**previous, **results}
        table = [{"benchmark": name, "command": r.get("command", ""), **row}
                 for name, r in results.items() for row in r.get("summary", [])]
    payload = {"device": device, "date": date, "platform": sys.platform, "cpu_count": os.cpu_count(),
               "results": results}
    tmp = jpath.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, jpath)
    md = render(table, device, date)
    mpath = out / f"{device}-latest.md"
    mpath.write_text(md)
    print("\n" + md)
    print(f"wrote {jpath} and {mpath}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
