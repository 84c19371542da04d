"""optim.offload=cpu on a CUDA GPU: BF16 parameters under FSDP2 over FP32 masters in pinned host
memory, stepped by DeepSpeed's CPU Adam with non-blocking copies, against the same model with
torch's fused AdamW on the GPU; and a checkpoint of the host masters (DCP views of CPU tensors)
loaded back. One process, its own NCCL group (tests/distributed checks every layout on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_exaone import checkpoint as ckpt
from megatron_exaone.config.schema import ParallelConfig
from megatron_exaone.model import tiny
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.parallel.build import build_chunks
from megatron_exaone.parallel.features import Build
from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
from megatron_exaone.training.offload import build_for_optimizer, offload_unavailable
from megatron_exaone.training.optim import build_optimizer
from tests.runs import free_port

pytestmark = pytest.mark.gpu
STEPS = 20


@pytest.fixture
def nccl_group(monkeypatch):
    reason = offload_unavailable()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield build_mesh(ParallelDims(), "cuda")
    dist.destroy_process_group()


def _build(mesh, offload: str):
    config = tiny(vocab_size=256)
    build = Build(config, ParallelConfig(), dims=mesh.dims, device_type="cuda")
    (model,) = build_chunks(build_for_optimizer(build, offload, "adamw"), mesh)
    return config, model, build_optimizer([model], lr=1e-3, offload=offload)


def _train(config, model, optimizer) -> list[float]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randint(0, config.vocab_size, (8, 64), device="cuda", generator=gen)
    losses = []
    for _ in range(STEPS):
        loss = model(x, labels=shift_left(x, 1, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_offloaded_bf16_parameters_train_as_adamw_on_the_gpu(nccl_group, tmp_path):
    mesh = nccl_group
    want = _train(*_build(mesh, "none"))
    config, model, optimizer = _build(mesh, "cpu")
    got = _train(config, model, optimizer)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    masters = optimizer.master_weights()
    assert all(m.dtype == torch.float32 and m.is_pinned() for m in masters.values())
    for p in model.parameters():
        torch.testing.assert_close(p.to_local(), masters[id(p)].to("cuda", torch.bfloat16))
    # FP32 gradients on the device against BF16 reduced gradients: close, not equal
    assert got[-1] < 0.8 * got[0]
    assert got[-1] == pytest.approx(want[-1], rel=0.02), (got, want)

    ckpt.save(tmp_path, STEPS, [model], optimizer, mesh)
    _config, again, again_optimizer = _build(mesh, "cpu")
    ckpt.load(tmp_path, [again], again_optimizer, mesh)
    loaded = again_optimizer.master_weights()
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(loaded[id(q)], masters[id(p)])
        assert torch.equal(q.to_local(), p.to_local())
