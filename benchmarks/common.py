"""Shared by the benchmark scripts: run a measurement in a fresh process (so peak memory is its own),
describe the machine, print a markdown table."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; {gpu}; torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory, or this process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(script: str, args: dict) -> dict:
    """Runs `script --worker JSON` in a new Python process and returns the JSON it prints last."""
    out = subprocess.run([sys.executable, script, "--worker", json.dumps(args)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"worker failed for {args}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def add_common_args(parser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--amp", choices=["none", "bf16"], default="none",
                        help="run every variant under torch.autocast(device, bfloat16)")
    parser.add_argument("--worker", help="internal: run one measurement")


def autocast(cfg: dict):
    """The variants' autocast context: bf16 on the measured device with `--amp bf16`, else none."""
    if cfg.get("amp", "none") == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(cfg["device"]).type, dtype=torch.bfloat16)


PATHS = {"full rows": False, "shared prefix": True}  # FrozenCLIP.shared_prefix of promptkit's two text paths


def setup_worker(cfg: dict):
    """Seeds, threads, device, the random-weight model (text path: `cfg["shared_prefix"]`, default on), C class
    names, image size."""
    import promptkit

    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    clip = promptkit.load_clip(cfg["arch"], device=device)
    clip.shared_prefix = cfg.get("shared_prefix", True)
    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return device, clip, [f"class number {i}" for i in range(cfg["classes"])], size
