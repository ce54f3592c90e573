"""Packed, bidirectional attention for the Qwen3-VL language model.

A row of a micro-batch may hold several sub-sequences (packing). ``seq_ids`` [B, L] names the
sub-sequence of every token (0, 1, ... inside a row; -1 on padding). A token attends to every token
of its own sub-sequence, in both directions, and to nothing else; a padding token attends only to
itself (so no softmax row is empty and nothing is NaN; its output is never used).

Backends (``backend`` argument, also the ``attention`` config value):
- ``"sdpa"``: ``F.scaled_dot_product_attention`` with a dense boolean [B, 1, L, L] block mask. The
  reference.
- ``"eager"``: matmul + softmax with the same mask as an additive bias (what the stock eager path does).
- ``"flex"``: ``torch.nn.attention.flex_attention`` with a document ``BlockMask``; compiled on CUDA,
  run uncompiled (slow but exact) on CPU.
- ``"flash"``: ``flash_attn_varlen_func`` over the flattened batch with ``cu_seqlens``,
  ``causal=False``; only where ``flash_attn`` imports.

How it hooks into stock transformers: each backend is registered in transformers'
``AttentionInterface`` under its name in :data:`REGISTERED_NAMES` and the text config's attention
implementation is set to that name (``trainer.model`` does it). Transformers dispatches on words inside
an implementation name (since 5.25 any name containing "flash" goes to its own flash-kernel loader;
"sdpa" and "flex_attention" trigger their dispatch checks), so the registered names use none of them.
Stock ``Qwen3VLTextModel.forward`` passes its extra keyword arguments down to the attention function,
so the block structure travels as the keyword ``packed_attention`` (a :class:`PackedAttention`, built
once per forward, not once per layer).
Because the name is not one of transformers' mask backends, transformers builds no mask of its own.

The causal flag is honoured: a module with ``is_causal = True`` gets a causal mask inside each
sub-sequence. docs/DESIGN.md §1 sets it to False on every text attention module; the tests flip it
back to show the difference per backend.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config.attention_names import ALIASES, BACKENDS

KWARG: str = "packed_attention"
"""Keyword under which the block structure reaches the attention functions."""


REGISTERED_NAMES: dict[str, str] = {
    "sdpa": "mdlm_packed_dense_mask",
    "eager": "mdlm_packed_matmul",
    "flex": "mdlm_packed_block_mask",
    "flash": "mdlm_packed_varlen",
}
"""Backend -> the name registered in transformers (no word transformers reads as one of its kernels)."""


def attn_implementation_name(backend: str) -> str:
    """The name under which ``backend`` is registered in transformers' ``AttentionInterface``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return REGISTERED_NAMES[backend]


def flash_attn_available() -> bool:
    """True when ``flash_attn`` imports (it needs CUDA and a matching build)."""
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or an ABI/CUDA error from a broken build
        return False
    return True


def normalize_backend(name: str) -> str:
    """Map an attention name (``sdpa``, ``eager``, ``flex``, ``flash`` or HF spellings) to a backend."""
    if name not in ALIASES:
        raise ValueError(f"unknown attention implementation {name!r}: choose one of {', '.join(BACKENDS)}")
    backend = ALIASES[name]
    if backend == "flash" and not flash_attn_available():
        raise ValueError("attention 'flash' needs the flash-attn package: pip install '.[flash]' or use flex")
    return backend


def resolve_backend(name: str, cuda: bool) -> str:
    """``auto`` -> flash (installed, GPU) > flex (GPU) > sdpa (CPU reference); other names normalised."""
    if name == "auto":
        return ("flash" if flash_attn_available() else "flex") if cuda else "sdpa"
    return normalize_backend(name)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this environment."""
    names = ["sdpa", "eager", "flex"]
    if torch.device(device).type == "cuda" and flash_attn_available():
        names.append("flash")
    return names


@dataclass
class PackedAttention:
    """Block structure of a packed micro-batch, prepared once per forward and shared by all layers.

    Build it with :func:`prepare_packed_attention`, which builds the bidirectional mask of the backend
    (once per batch, outside any compiled decoder layer); a causal one is made on first use. Masks are
    cached here, so a 28-layer model builds each mask once.
    """

    backend: str
    """One of :data:`BACKENDS`."""
    seq_ids_BL: torch.Tensor
    """[B, L] long: sub-sequence index inside its row, -1 on padding."""
    cu_seqlens: torch.Tensor | None = None
    """[N+1] int32 boundaries of contiguous runs over the flattened batch (flash only)."""
    max_seqlen: int = 0
    """Longest run in ``cu_seqlens`` (flash only)."""
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def dense_mask(self, causal: bool) -> torch.Tensor:
        """[B, 1, L, L] bool, True where query i may attend to key j."""
        key = ("dense", causal)
        if key not in self._cache:
            self._cache[key] = dense_block_mask(self.seq_ids_BL, causal=causal)
        return self._cache[key]

    def block_mask(self, causal: bool) -> Any:
        """Flex ``BlockMask`` for the same structure as :meth:`dense_mask`."""
        key = ("flex", causal)
        if key not in self._cache:
            self._cache[key] = flex_block_mask(self.seq_ids_BL, causal=causal)
        return self._cache[key]


def dense_block_mask(seq_ids_BL: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Boolean block-diagonal mask [B, 1, L, L] from ``seq_ids`` (see the module docstring)."""
    length = seq_ids_BL.shape[1]
    same_BLL = (seq_ids_BL[:, :, None] == seq_ids_BL[:, None, :]) & (seq_ids_BL[:, :, None] >= 0)
    eye_LL = torch.eye(length, dtype=torch.bool, device=seq_ids_BL.device)
    allowed_BLL = same_BLL | eye_LL
    if causal:
        allowed_BLL = allowed_BLL & torch.ones_like(eye_LL).tril()
    return allowed_BLL[:, None]


def flex_block_mask(seq_ids_BL: torch.Tensor, causal: bool = False) -> Any:
    """Document ``BlockMask`` for flex attention, equal to :func:`dense_block_mask`."""
    from torch.nn.attention.flex_attention import create_block_mask

    seq_ids_BL = seq_ids_BL.contiguous()

    def document(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        seq_q = seq_ids_BL[b, q]
        allowed = ((seq_q == seq_ids_BL[b, kv]) & (seq_q >= 0)) | (q == kv)
        if causal:
            allowed = allowed & (kv <= q)
        return allowed

    batch, length = seq_ids_BL.shape
    on_cuda = seq_ids_BL.device.type == "cuda"
    return create_block_mask(
        document, batch, None, length, length, device=seq_ids_BL.device, _compile=on_cuda
    )


def varlen_boundaries(seq_ids_BL: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``cu_seqlens`` [N+1] int32 and the longest run over the flattened [B*L] batch.

    A run is a maximal stretch of equal ``seq_ids`` inside one row; padding runs become their own
    (ignored) segments. Sub-sequences must be contiguous inside a row, as the packer makes them.
    """
    batch, length = seq_ids_BL.shape
    flat_N = seq_ids_BL.reshape(-1)
    starts_N = torch.ones_like(flat_N, dtype=torch.bool)
    starts_N[1:] = flat_N[1:] != flat_N[:-1]
    starts_N[::length] = (
        True  # every row starts a run, even if its first id equals the last of the row before
    )
    start_idx = starts_N.nonzero().flatten()
    cu_seqlens = torch.cat([start_idx, start_idx.new_tensor([batch * length])]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return cu_seqlens, max_seqlen


def prepare_packed_attention(
    seq_ids_BL: torch.Tensor,
    backend: str,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> PackedAttention:
    """Package the block structure for ``backend``; pass the result as ``packed_attention=...``."""
    attn_implementation_name(backend)  # validates the name
    packed = PackedAttention(backend=backend, seq_ids_BL=seq_ids_BL.long())
    if backend == "flash":
        if cu_seqlens is None or max_seqlen is None:
            cu_seqlens, max_seqlen = varlen_boundaries(seq_ids_BL)
        packed.cu_seqlens = cu_seqlens.to(device=seq_ids_BL.device, dtype=torch.int32)
        packed.max_seqlen = int(max_seqlen)
    elif backend == "flex":
        # The bidirectional mask (docs/DESIGN.md §1) is built here, not by the first layer: a compiled
        # layer would trace its build and recompile for the layers that find it cached.
        packed.block_mask(causal=False)
    else:
        packed.dense_mask(causal=False)
    return packed


def _structure(kwargs: dict[str, Any], query_BHLD: torch.Tensor, backend: str) -> PackedAttention:
    packed = kwargs.get(KWARG)
    if packed is None:
        # Called without packing information (e.g. a stock forward): every row is one sequence.
        batch, _, length, _ = query_BHLD.shape
        seq_ids_BL = torch.zeros(batch, length, dtype=torch.long, device=query_BHLD.device)
        packed = prepare_packed_attention(seq_ids_BL, backend)
        kwargs[KWARG] = packed
    return packed


def _repeat_kv(x_BHLD: torch.Tensor, num_groups: int) -> torch.Tensor:
    return x_BHLD if num_groups == 1 else x_BHLD.repeat_interleave(num_groups, dim=1)


def sdpa_packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Dense-mask SDPA. q/k/v [B, H, L, D] (k/v may have fewer heads); returns [B, L, H, D]."""
    packed = _structure(kwargs, query, "sdpa")
    mask_B1LL = packed.dense_mask(causal=bool(getattr(module, "is_causal", False)))
    groups = query.shape[1] // key.shape[1]
    out_BHLD = F.scaled_dot_product_attention(
        query,
        _repeat_kv(key, groups),
        _repeat_kv(value, groups),
        attn_mask=mask_B1LL,
        dropout_p=dropout,
        scale=scaling,
    )
    return out_BHLD.transpose(1, 2).contiguous(), None


def eager_packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matmul + fp32 softmax with an additive bias from the same mask; returns ([B, L, H, D], probs)."""
    packed = _structure(kwargs, query, "eager")
    mask_B1LL = packed.dense_mask(causal=bool(getattr(module, "is_causal", False)))
    groups = query.shape[1] // key.shape[1]
    key_BHLD, value_BHLD = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores_BHLL = torch.matmul(query, key_BHLD.transpose(2, 3)) * scale
    scores_BHLL = scores_BHLL.masked_fill(~mask_B1LL, torch.finfo(scores_BHLL.dtype).min)
    # Softmax in at least fp32 (as stock eager does for bf16), in fp64 for fp64 inputs.
    softmax_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    probs_BHLL = F.softmax(scores_BHLL, dim=-1, dtype=softmax_dtype).to(query.dtype)
    probs_BHLL = F.dropout(probs_BHLL, p=dropout, training=module.training)
    out_BHLD = torch.matmul(probs_BHLL, value_BHLD)
    return out_BHLD.transpose(1, 2).contiguous(), probs_BHLL


@functools.cache
def _compiled_flex_attention() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Flex attention with a document ``BlockMask`` (GQA native); returns [B, L, H, D]."""
    from torch.nn.attention.flex_attention import flex_attention

    if dropout > 0.0:
        raise ValueError("attention dropout is not supported by the flex backend: set it to 0 or use sdpa")
    packed = _structure(kwargs, query, "flex")
    block_mask = packed.block_mask(causal=bool(getattr(module, "is_causal", False)))
    enable_gqa = query.shape[1] != key.shape[1]
    if torch.compiler.is_compiling():
        # Inside a compiled decoder layer (model.compile): that compilation lowers flex itself.
        out_BHLD = flex_attention(
            query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=enable_gqa
        )
    elif query.device.type == "cuda":
        out_BHLD = _compiled_flex_attention()(
            query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=enable_gqa
        )
    else:
        with warnings.catch_warnings():
            # Uncompiled on CPU on purpose (tests, tiny demo); torch warns that it is unfused.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out_BHLD = flex_attention(
                query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=enable_gqa
            )
    return out_BHLD.transpose(1, 2).contiguous(), None


def flash_packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``flash_attn_varlen_func`` over the flattened batch with ``cu_seqlens``; returns [B, L, H, D]."""
    from flash_attn import flash_attn_varlen_func

    packed = _structure(kwargs, query, "flash")
    batch, heads, length, dim = query.shape
    # flash-attn wants [tokens, heads, dim]; GQA is native (fewer k/v heads).
    q_THD = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k_THD = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    v_THD = value.transpose(1, 2).reshape(batch * length, value.shape[1], dim)
    out_THD = flash_attn_varlen_func(
        q_THD,
        k_THD,
        v_THD,
        cu_seqlens_q=packed.cu_seqlens,
        cu_seqlens_k=packed.cu_seqlens,
        max_seqlen_q=packed.max_seqlen,
        max_seqlen_k=packed.max_seqlen,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=bool(getattr(module, "is_causal", False)),
    )
    return out_THD.reshape(batch, length, heads, dim), None


_FUNCTIONS = {
    "sdpa": sdpa_packed_attention,
    "eager": eager_packed_attention,
    "flex": flex_packed_attention,
    "flash": flash_packed_attention,
}


def register_attention_backends() -> None:
    """Register every backend in transformers' ``AttentionInterface`` (idempotent)."""
    from transformers import AttentionInterface

    for backend, function in _FUNCTIONS.items():
        AttentionInterface.register(attn_implementation_name(backend), function)
