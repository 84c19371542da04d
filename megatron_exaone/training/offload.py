"""Optimizer state on the CPU (`optim.offload=cpu`): AdamW whose FP32 master weights and moments
live in host memory and step in DeepSpeed's vectorised CPU Adam (`DeepSpeedCPUAdam`, the step of
ZeRO-Offload).

Per parameter, on this rank's local piece (after TP / EP / FSDP2 sharding), the host holds the FP32
master weight, its FP32 gradient and the two Adam moments (16 bytes per element, pinned when CUDA
is present). A step copies the reduced gradients to the host, bucket by bucket, steps each bucket
as soon as its gradients have arrived while the next ones are still in flight, and sends each
updated bucket back in the device parameters' dtype while the CPU steps the next one; the next
forward queues behind those copies on the same stream.

The device parameters keep the dtype the layout computes in (`device_param_dtype`): BF16 when FSDP2
computes in BF16 and every parameter is under AdamW, so the GPU holds 2-byte weights and gradients
(FSDP2 accumulates micro-batch gradients in its FP32 reduce dtype); FP32 otherwise (CPU runs, Muon,
no FSDP2), where only the moments leave the GPU. Muon's matrices stay on the GPU: it
orthogonalises full matrices with collectives there.

The state looks like `torch.optim.AdamW`'s (`exp_avg`, `exp_avg_sq`, `step` per parameter) and the
checkpoint saves the FP32 masters as the model's weights, so checkpoints are the same with and
without offload and a run can switch it across a resume.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator, MutableMapping

import torch

from megatron_exaone.errors import UserError
from megatron_exaone.parallel.features import Build
from megatron_exaone.parallel.sharding import local_tensor

log = logging.getLogger(__name__)
EXTRA_HINT = "pip install 'megatron-exaone[deepspeed]'"
# elements per bucket: the host step of one bucket overlaps the transfers of the next
BUCKET_ELEMENTS = 1 << 25


class OffloadUnavailable(UserError, RuntimeError):
    """`optim.offload=cpu` cannot run here (DeepSpeed missing, or its CPU Adam op cannot be
    built)."""


def offload_unavailable() -> str | None:
    """Why DeepSpeed's CPU Adam cannot run here, in one line; None if it can (installed, and its op
    prebuilt or buildable: ninja and a C++ compiler present). Does not import DeepSpeed."""
    if importlib.util.find_spec("deepspeed") is None:
        return f"optim.offload=cpu needs DeepSpeed's CPU Adam: install it with `{EXTRA_HINT}`"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None or importlib.util.find_spec("ninja") is None:
        if not _op_prebuilt():
            return (
                "optim.offload=cpu: DeepSpeed's CPU Adam op is not built and cannot be built here "
                f"(it needs ninja and the C++ compiler {compiler!r}); install a compiler, or "
                f"install the extra prebuilt with `DS_BUILD_CPU_ADAM=1 {EXTRA_HINT}`"
            )
    return None


def _op_prebuilt() -> bool:
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get("cpu_adam"))


def load_cpu_adam() -> type:
    """`DeepSpeedCPUAdam`, its C++ op built on first use (cached under TORCH_EXTENSIONS_DIR)."""
    reason = offload_unavailable()
    if reason:
        raise OffloadUnavailable(reason)
    # DeepSpeed guesses its accelerator and warns on stdout when it finds no GPU: tell it
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
    except Exception as exc:  # a failed C++ build raises whatever the toolchain raised
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OffloadUnavailable(
            f"optim.offload=cpu: DeepSpeed's CPU Adam op did not build ({first}); see the README's "
            f"'Optimizer offload' section, or reinstall with `DS_BUILD_CPU_ADAM=1 {EXTRA_HINT}`"
        ) from None
    return DeepSpeedCPUAdam


def device_param_dtype(offload: str, optimizer: str, fsdp: bool, bf16: bool) -> torch.dtype:
    """The dtype the device parameters are stored in: BF16 when the optimizer keeps every master
    weight on the host (`offload` "cpu" with AdamW) and FSDP2 computes in BF16 (it accumulates and
    reduces gradients in FP32); FP32 (the parameters are the master weights) otherwise."""
    if offload == "cpu" and optimizer == "adamw" and fsdp and bf16:
        return torch.bfloat16
    return torch.float32


def build_for_optimizer(build: Build, offload: str, optimizer: str) -> Build:
    """`build` with the device parameters stored in the dtype `device_param_dtype` gives for this
    optimizer and offload (what the trainer builds)."""
    dtype = device_param_dtype(offload, optimizer, build.parallel.fsdp, build.bf16)
    return dataclasses.replace(build, param_dtype=dtype)


class _HostState(MutableMapping):
    """`optimizer.state` keyed by the device parameters: each one's state is CPU Adam's state of its
    host master (`step` an int, `exp_avg`, `exp_avg_sq` FP32 host tensors of the local shape)."""

    def __init__(self, masters: dict[torch.Tensor, torch.Tensor], host: MutableMapping) -> None:
        self._masters = masters
        self._host = host

    def __getitem__(self, param: torch.Tensor) -> dict:
        state = self._host.get(self._masters[param]) if param in self._masters else None
        if not state:
            raise KeyError(param)
        return state

    def __setitem__(self, param: torch.Tensor, value: dict) -> None:
        self._host[self._masters[param]] = value

    def __delitem__(self, param: torch.Tensor) -> None:
        del self._host[self._masters[param]]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for p, m in self._masters.items() if self._host.get(m))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class CpuOffloadAdamW(torch.optim.Optimizer):
    """AdamW over device parameters whose FP32 masters, gradients and moments live on the host and
    step in `DeepSpeedCPUAdam` (decoupled weight decay, bias correction: torch's AdamW within FP32
    rounding). `param_groups` are the device parameters' (the LR is set on them each step)."""

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        betas: tuple[float, float],
        eps: float,
    ) -> None:
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))
        pin = torch.cuda.is_available()
        self.masters: dict[torch.Tensor, torch.Tensor] = {}
        self.host_grads: dict[torch.Tensor, torch.Tensor] = {}
        master_groups = []
        for group in self.param_groups:
            host_params = []
            for p in group["params"]:
                local = local_tensor(p.detach())
                master = torch.empty(local.shape, dtype=torch.float32, pin_memory=pin)
                master.copy_(local)
                self.masters[p] = master
                self.host_grads[p] = torch.empty_like(master, pin_memory=pin)
                host_params.append(master)
            master_groups.append({"params": host_params, "weight_decay": group["weight_decay"]})
        cpu_adam = load_cpu_adam()
        self.host_adam = cpu_adam(
            master_groups, lr=lr, betas=betas, eps=eps, adamw_mode=True, fp32_optimizer_states=True
        )
        self.state = _HostState(self.masters, self.host_adam.state)
        elements = sum(m.numel() for m in self.masters.values())
        log.info(
            "AdamW steps on the host (DeepSpeed CPU Adam): %.2fM local parameters, %.2f GiB of "
            "host memory for FP32 masters, gradients and moments",
            elements / 1e6,
            16 * elements / 2**30,
        )

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("CpuOffloadAdamW.step takes no closure")
        for group, host_group in zip(self.param_groups, self.host_adam.param_groups):
            for key in ("lr", "betas", "eps", "weight_decay"):
                host_group[key] = group[key]
        buckets = self._buckets()
        arrived = []
        for bucket in buckets:  # every gradient copy is queued before the CPU starts stepping
            for p in bucket:
                self.host_grads[p].copy_(local_tensor(p.grad), non_blocking=True)
            arrived.append(_event_after_copies(bucket[0].device))
        for bucket, event in zip(buckets, arrived):
            if event is not None:
                event.synchronize()
            for p in bucket:
                self.masters[p].grad = self.host_grads[p]
            self.host_adam.step()
            for p in bucket:
                self.masters[p].grad = None
                local_tensor(p.detach()).copy_(self.masters[p], non_blocking=True)
        return None

    def _buckets(self) -> list[list[torch.Tensor]]:
        """The parameters with a gradient, in groups of about `BUCKET_ELEMENTS`."""
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for p in self.masters:
            if p.grad is None:
                continue
            if size >= BUCKET_ELEMENTS:
                buckets.append([])
                size = 0
            buckets[-1].append(p)
            size += self.masters[p].numel()
        return [b for b in buckets if b]

    def load_masters_into_params(self) -> None:
        """Copy the masters (just loaded from a checkpoint) to the device parameters."""
        with torch.no_grad():
            for p, master in self.masters.items():
                local_tensor(p.detach()).copy_(master)


def _event_after_copies(device: torch.device) -> torch.cuda.Event | None:
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def main() -> int:
    """`python -m megatron_exaone.training.offload`: build DeepSpeed's CPU Adam op now (about a
    minute; cached under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so that the
    first run with optim.offload=cpu does not wait for the compiler."""
    import time

    start = time.perf_counter()
    print("Building (or loading the cached build of) DeepSpeed's CPU Adam op ...", flush=True)
    try:
        load_cpu_adam()
    except OffloadUnavailable as exc:
        print(f"error: {exc}", flush=True)
        return 1
    print(f"DeepSpeed's CPU Adam op is ready ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
