"""Self-attention with its two activation-by-activation matmuls as modules.

Attention multiplies activations by activations: ``q @ kᵀ`` and ``a @ v``. On the
crossbars one operand of such a matmul is written into the array at run time (the
*stored* operand, ``kᵀ`` and ``v``) and the other is driven into it bit-serially (the
*driven* operand, ``q`` and the attention weights ``a``). ``ActivationMatmul`` gives each of
these matmuls a module path, so precision policies can name it like a ``Linear`` layer
and QAT can quantize its operands (``tvm_cim.learn.qat``).

``SelfAttention`` is ``nn.MultiheadAttention`` (self-attention, batch first, no masks and
no attention dropout) written out with those modules; it loads
``nn.MultiheadAttention``'s state dicts (``in_proj_weight``, ``in_proj_bias``) as they are.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tvm_cim.core.errors import CimError

__all__ = ["ActivationMatmul", "SelfAttention"]


class ActivationMatmul(nn.Module):
    """``torch.matmul(x, stored)`` of two activations, batched over leading dimensions.

    ``x`` is the driven operand (``[..., M, K]``), ``stored`` the operand written into the
    crossbar (``[..., K, N]``); in a prepared QAT model they take the policy's ``a_bits``
    and ``w_bits`` respectively.
    """

    def forward(self, x: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, stored)


class SelfAttention(nn.Module):
    """Multi-head self-attention with visible matmuls.

    ``in_proj`` (``Linear`` hidden -> 3 * hidden) computes queries, keys and values,
    ``qk`` the scores ``q @ kᵀ`` per head (driven ``q`` ``[B, H, L, d]``, stored ``kᵀ``
    ``[B, H, d, L]``), which are scaled by ``1 / sqrt(d)`` and softmaxed, ``av`` the
    weighted values ``a @ v`` and ``out_proj`` (``Linear``) mixes the heads. The
    submodules are declared in that order, which is their ``named_modules()`` order.

    Parameters
    ----------
    hidden_dim
        Token width, a multiple of ``num_heads``.
    num_heads
        Attention heads.
    """

    def __init__(self, hidden_dim: int, num_heads: int) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise CimError(f"hidden_dim {hidden_dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.in_proj = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.qk = ActivationMatmul()
        self.av = ActivationMatmul()
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)
        # nn.MultiheadAttention's initialisation.
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)
        self.register_load_state_dict_pre_hook(_rename_multihead_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, hidden = x.shape
        qkv = self.in_proj(x).reshape(b, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, d]
        scores = self.qk(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        out = self.av(torch.softmax(scores, dim=-1), v)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, hidden))


def _rename_multihead_keys(module, state_dict, prefix, *_) -> None:
    """``nn.MultiheadAttention``'s ``in_proj_weight``/``in_proj_bias`` become ``in_proj.*``."""
    for old, new in (("in_proj_weight", "in_proj.weight"), ("in_proj_bias", "in_proj.bias")):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
