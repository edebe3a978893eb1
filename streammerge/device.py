"""Where the merge kernels run: the plan's ``device`` (cpu, cuda, auto) resolved once, at the edge.

``cuda`` without a usable GPU is a plan error naming why; ``auto`` takes the GPU when there is one
and otherwise runs on the CPU, saying so in the run's summary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streammerge.errors import PlanError

GPU_FREE_SHARE = 0.8  # of the free device memory, the default --max-gpu-memory: the CUDA context and other processes keep the rest


@dataclass(frozen=True)
class Device:
    torch: torch.device
    description: str  # for the summary: "cpu", "cpu (no CUDA)", "cuda:0 (NVIDIA H100 80GB HBM3)"

    @property
    def is_cuda(self) -> bool:
        return self.torch.type == "cuda"


CPU = Device(torch.device("cpu"), "cpu")


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} built without CUDA"
    return f"torch {torch.__version__} built for CUDA {torch.version.cuda}, but no GPU or driver is usable"


def resolve_device(requested: str) -> Device:
    """The device of a plan's ``device`` key: ``cpu``, ``cuda`` (an error without CUDA) or ``auto``."""
    if requested == "cpu":
        return CPU
    if not torch.cuda.is_available():
        if requested == "auto":
            return Device(torch.device("cpu"), "cpu (no CUDA)")
        raise PlanError(f"device: CUDA requested but torch.cuda.is_available() is false ({_why_no_cuda()}); "
                        "use --device cpu or auto")
    index = torch.cuda.current_device()
    return Device(torch.device("cuda", index), f"cuda:{index} ({torch.cuda.get_device_name(index)})")


def device_budget(device: Device, max_gpu_memory: int | None) -> int | None:
    """Bytes of GPU memory for working chunks: ``max_gpu_memory``, else a share of what is free now
    (None on the CPU, where only the host budget applies)."""
    if not device.is_cuda:
        return None
    if max_gpu_memory is not None:
        return max_gpu_memory
    free, _ = torch.cuda.mem_get_info(device.torch)
    return int(free * GPU_FREE_SHARE)
