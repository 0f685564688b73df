"""The exponential moving average of a model's weights (`EMA`), and the plain model rank 0 validates, samples and
exports (`evaluation_model`: the EMA weights when there is an EMA, gathered to rank 0 when they are sharded)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from muse.train.runtime import Runtime, is_sharded, unwrap


class EMA:
    """An exponential moving average of a model's weights: one float32 tensor per entry of its state dict.

    Parameters are averaged; buffers (e.g. the VQGAN's EMA codebook, norm statistics) are copied, since they are
    running statistics of the live model already. Under FSDP the tensors are shards like the model's, so the average
    costs 1/world_size of the memory too; `evaluation_model` gathers them when rank 0 needs the whole model.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        live = unwrap(model)
        self.param_names = [name for name, _ in live.named_parameters()]
        self.tensors: dict[str, Tensor] = {name: t.detach().clone() for name, t in live.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = unwrap(model)
        params = dict(live.named_parameters())
        averaged = [self.tensors[name] for name in self.param_names]
        # One fused kernel per dtype group instead of one per tensor: hundreds of launches on a large model.
        torch._foreach_lerp_(averaged, [params[name].detach() for name in self.param_names], 1.0 - self.decay)
        for name, buffer in live.named_buffers():
            if name in self.tensors:
                self.tensors[name].copy_(buffer)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state.keys() != self.tensors.keys():
            missing, unexpected = sorted(self.tensors.keys() - state.keys()), sorted(state.keys() - self.tensors.keys())
            # ValueError, not CheckpointError: `restore` names the checkpoint around it (and ema.py stays below it).
            raise ValueError(f"the EMA state does not match the model: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                tensor.copy_(state[name])


def evaluation_model(model: nn.Module, ema: EMA | None, rt: Runtime) -> nn.Module | None:
    """The model rank 0 validates, samples and exports: the EMA weights when there is an EMA, else the live weights.
    None on the other ranks. A collective when the weights are sharded (they are gathered to rank 0)."""
    live = unwrap(model)
    state = ema.state_dict() if ema is not None else live.state_dict()
    sharded = any(is_sharded(t) for t in state.values())
    if not sharded and ema is None:
        return live if rt.is_main else None
    if sharded:
        state = {name: t.full_tensor() if is_sharded(t) else t for name, t in state.items()}  # every rank gathers
    if not rt.is_main:
        return None
    # Built on the meta device and given the tensors themselves: no init, no copy of the weights.
    with torch.device("meta"):
        plain = type(live)(live.config)
    plain.load_state_dict(state, assign=True)
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta:  # a non-persistent buffer (not in the state dict): the live model's
            module_name, _, buffer_name = name.rpartition(".")
            plain.get_submodule(module_name).register_buffer(buffer_name, live.get_buffer(name).clone(),
                                                             persistent=False)
    return plain.to(rt.device).eval().requires_grad_(False)


__all__ = ["EMA", "evaluation_model"]
