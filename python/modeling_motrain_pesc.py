"""A PESC model exported by `motrain export` (arXiv 2401.02731, as motrain computes it): a Llama
whose chosen blocks' SwiGLU FFN feeds a Mixture of adapter experts,

    y = FFN(x);  out = y + sum_j w_j * s * Up_j(GELU(Down_j(y)))

with the top-k experts j chosen by a linear router on x and w the softmax over the chosen logits.
An expert is the shared FFN followed by its adapter, which no Mixtral expert (one SwiGLU) can hold
exactly, so the folder carries this file and loads with `trust_remote_code=True`, as the PESC
authors' Camelidae checkpoints do. Tensor names are motrain's: `mlp.router.weight` [E, d],
`mlp.adapters.down` [E, a, d], `mlp.adapters.up` [E, d, a].
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


class MotrainPescConfig(LlamaConfig):
    model_type = "motrain_pesc"

    def __init__(self, pesc_layers=None, pesc_num_experts=8, pesc_top_k=2, pesc_adapter_dim=64,
                 pesc_adapter_scale=1.0, **kwargs):
        self.pesc_layers = list(pesc_layers or [])
        self.pesc_num_experts = pesc_num_experts
        self.pesc_top_k = pesc_top_k
        self.pesc_adapter_dim = pesc_adapter_dim
        self.pesc_adapter_scale = pesc_adapter_scale
        super().__init__(**kwargs)


class PescAdapters(nn.Module):
    def __init__(self, experts, d, a):
        super().__init__()
        self.down = nn.Parameter(torch.zeros(experts, a, d))
        self.up = nn.Parameter(torch.zeros(experts, d, a))


class PescMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.router = nn.Linear(d, config.pesc_num_experts, bias=False)
        self.adapters = PescAdapters(config.pesc_num_experts, d, config.pesc_adapter_dim)
        self.top_k = config.pesc_top_k
        self.scale = config.pesc_adapter_scale

    def forward(self, x):
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        top, idx = self.router(x).topk(self.top_k, dim=-1)
        w = top.softmax(dim=-1)
        out = y
        for k in range(self.top_k):
            down = self.adapters.down[idx[..., k]]  # [..., a, d]
            up = self.adapters.up[idx[..., k]]  # [..., d, a]
            h = F.gelu(torch.einsum("...ad,...d->...a", down, y))
            out = out + w[..., k:k + 1] * self.scale * torch.einsum("...da,...a->...d", up, h)
        return out


class MotrainPescForCausalLM(LlamaForCausalLM):
    config_class = MotrainPescConfig

    def __init__(self, config):
        super().__init__(config)
        for i in config.pesc_layers:
            self.model.layers[i].mlp = PescMLP(config)
