"""Where a study trains: ``[training] device`` resolved to a ``torch.device``, and its description.

``resolve`` refuses a device this machine does not have (one line, exit 2, before anything is
written); ``describe`` gives the provenance fields (device name, CUDA, cuDNN and driver versions);
``set_precision`` turns TensorFloat-32 off unless the study asked for bf16, so CUDA float32 matmuls
stay float32 (TF32 rounds a matmul's inputs to 10 mantissa bits on Ampere and later GPUs).
"""

from __future__ import annotations

import platform
import subprocess

import torch

from pipeline.config import DEVICE_PATTERN
from pipeline.errors import UsageError


class DeviceError(UsageError):
    """A ``[training] device`` this machine cannot give; nothing was run."""


def resolve(spec: str = "auto", where: str = "") -> torch.device:
    """``auto`` → the first CUDA device when ``torch.cuda.is_available()``, else the CPU; ``cpu``,
    ``cuda`` and ``cuda:N`` as written, refused (``DeviceError``) when this machine lacks them.
    ``where``: the study file, named at the start of the message."""
    asked = f"{where}: training.device = {spec!r}" if where else f"training.device = {spec!r}"
    if not DEVICE_PATTERN.fullmatch(spec):
        raise DeviceError(f"{asked}: must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda", 0)
    fix = "use device = 'cpu' or 'auto'; nothing was run"
    if not torch.cuda.is_available():
        built = f"torch {torch.__version__}" + (
            f", built for CUDA {torch.version.cuda}" if torch.version.cuda else ""
        )
        raise DeviceError(f"{asked}, but this machine has no CUDA device ({built}); {fix}")
    index = int(spec.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"{asked}, but this machine has {count} CUDA device"
            f"{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1}); {fix}"
        )
    return torch.device("cuda", index)


def set_precision(precision: str) -> None:
    """TF32 off for CUDA matmuls and convolutions unless ``precision = "bf16"`` (which already
    trades precision for speed): a float32 study computes in float32 on every device."""
    if precision != "bf16":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def describe(device: torch.device) -> dict[str, str]:
    """Provenance of ``device``: its name, and the CUDA runtime, cuDNN and driver versions for a GPU."""
    if device.type != "cuda":
        return {"device": str(device), "device_name": _cpu_name()}
    index = device.index if device.index is not None else torch.cuda.current_device()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "device": f"cuda:{index}",
        "device_name": torch.cuda.get_device_name(index),
        "cuda": str(torch.version.cuda),
        "cudnn": str(cudnn) if cudnn else "none",
        "cuda_driver": _driver_version(index),
    }


def _cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version(index: int) -> str:
    """The NVIDIA driver's version from ``nvidia-smi`` (torch does not report it); unknown without it."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out.splitlines()[0] if out else "unknown"
