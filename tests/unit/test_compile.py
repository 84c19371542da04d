"""`parallel.compile`: compiled decoder layers give the eager model's loss, gradients and routing
counts (CPU inductor, fp32), also with recompute (done by the compiler), which saves fewer
activations; names and state dicts are unchanged; under FSDP2 a compiled layer stays one graph."""

import torch
from torch.distributed.fsdp import FSDPModule

from megatron_exaone.model import build_model, tiny
from megatron_exaone.model.moe import MoEBlock
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.parallel.build import build_parallel_model
from megatron_exaone.parallel.compile import apply_compile
from megatron_exaone.parallel.data_parallel import apply_data_parallel
from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
from megatron_exaone.parallel.testing import run_distributed


def saved_bytes(loss: torch.Tensor) -> int:
    """Bytes the autograd graph of `loss` holds for backward."""
    seen, total, stack = set(), 0, [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        total += sum(
            t.numel() * t.element_size()
            for t in getattr(node, "saved_tensors", None) or ()
            if isinstance(t, torch.Tensor)
        )
        stack.extend(next_node for next_node, _ in node.next_functions)
    return total


def test_compiled_layers_match_eager_with_and_without_recompute():
    config = tiny(aux_loss_coeff=0.01)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (2, 48), generator=gen)
    # two packed documents
    positions = torch.cat([torch.arange(30), torch.arange(18)]).expand(2, -1)
    labels = shift_left(x, 1, -100)
    models, saved = {}, {}
    for variant in ("eager", "compiled", "recomputed"):
        torch._dynamo.reset()  # compiled code is shared per function; each variant compiles its own
        model = models[variant] = build_model(config, seed=0)
        if variant != "eager":
            names = list(model.state_dict())
            assert (
                apply_compile(model, recompute=variant == "recomputed")
                == config.num_hidden_layers + config.num_nextn_predict_layers
            )
            assert list(model.state_dict()) == names
        out = model(x, labels=labels, position_ids=positions, return_logits=False)
        saved[variant] = saved_bytes(out.loss)
        out.loss.backward()
        models[variant].loss = out.loss.detach()
    eager = models["eager"]
    for variant in ("compiled", "recomputed"):
        model = models[variant]
        torch.testing.assert_close(model.loss, eager.loss, rtol=1e-6, atol=1e-6)
        for (name, a), b in zip(eager.named_parameters(), model.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
        for a, b in zip(eager.modules(), model.modules()):
            if isinstance(a, MoEBlock):  # the recomputation must not count routed tokens twice
                torch.testing.assert_close(b.tokens_per_expert, a.tokens_per_expert, rtol=0, atol=0)
    assert saved["recomputed"] < 0.8 * saved["compiled"], saved


def _compiled_fsdp_graph_breaks(rank: int, world: int) -> tuple[int, bool]:
    mesh = build_mesh(ParallelDims(dp=world), "cpu")
    config = tiny(vocab_size=128)
    # BF16: one grouped GEMM
    model = build_parallel_model(config, mesh, seed=0, device="cpu").to(torch.bfloat16)
    apply_compile(model, backend="eager")  # graph breaks are Dynamo's: no kernels need generating
    apply_data_parallel(model, mesh, bf16=False)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(rank))
    torch._dynamo.utils.counters.clear()
    model(x, labels=shift_left(x, 1, -100)).loss.backward()
    experts_units = any(
        isinstance(m.experts, FSDPModule) for m in model.modules() if isinstance(m, MoEBlock)
    )
    return sum(torch._dynamo.utils.counters["graph_break"].values()), experts_units


def test_fsdp_keeps_each_compiled_layer_one_graph():
    """Under FSDP2 with tp = ep = 1 the routed experts stay in their layer's FSDP unit: no FSDP
    hooks inside a compiled layer, so its forward and backward compile without graph breaks (a unit
    of their own broke every MoE layer's graph at the experts' call)."""
    for breaks, experts_units in run_distributed(_compiled_fsdp_graph_breaks, 2, timeout_s=120):
        assert breaks == 0 and not experts_units
