"""Model assembly: Qwen3-VL as a bidirectional masked diffusion LM with LoRA on its language model.

:func:`build_mdlm_model` loads a stock ``Qwen3VLForConditionalGeneration`` (path or hub id) and
:func:`assemble_mdlm_model` turns it into an :class:`MDLMModel`:

- the language model is made bidirectional (docs/DESIGN.md §1: ``text_config.is_causal = False``
  AND ``is_causal = False`` on every text attention module) and its attention runs through a packed
  backend from :mod:`trainer.model.attention`;
- ``<|mask|>`` is registered in the tokenizer (151669 for Qwen; the 151,936-row embedding already
  has room, it is never resized down);
- the vision side (encoder, merger, deepstack mergers) is frozen;
- PEFT LoRA goes on the language model's layers only, and ``trainable_token_indices`` makes the mask
  token's embedding row (and nothing else of the embedding) trainable. PEFT wraps the whole stock
  ``Qwen3VLForConditionalGeneration``, so module names stay stock and the adapter saved by
  ``peft_model.save_pretrained`` loads with stock ``peft`` onto stock ``transformers``.

The forward is split in two (docs/DESIGN.md §2): :meth:`MDLMModel.vision_features` runs the frozen vision
tower under ``torch.no_grad()``, outside DeepSpeed; :class:`MDLMLanguageModel` (``engine_module``)
is the trainable part that goes into the DeepSpeed engine. No deepspeed / torch.distributed here.
Both take the loader's uint8 patches (normalised here, on the device: :mod:`trainer.model.pixels`) or an
image processor's float pixel values.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainer.config import LoraConfig, ModelConfig
from trainer.model import attention, diffusion
from trainer.model.peft_tokens import quiet_peft_wrapping, use_sparse_trainable_tokens
from trainer.model.pixels import PixelNormaliser
from trainer.model.tokens import IM_START, MASK_TOKEN

QWEN_MASK_TOKEN_ID = 151_669
QWEN_IM_START_ID = 151_644  # identifies the Qwen vocabulary


@dataclass
class VisionFeatures:
    """What the vision tower hands to the language model."""

    image_embeds: torch.Tensor
    """[I_tok, H]: merged image tokens of all images, in row-major order of appearance."""
    deepstack: list[torch.Tensor] = field(default_factory=list)
    """One [I_tok, H] tensor per deepstack layer, added to the visual positions of the first LM layers."""

    def to(self, device: torch.device | str) -> VisionFeatures:
        """The same features on ``device``."""
        return VisionFeatures(self.image_embeds.to(device), [d.to(device) for d in self.deepstack])


@dataclass
class MDLMOutput:
    """Output of :class:`MDLMLanguageModel` when targets are given."""

    loss: torch.Tensor
    """Normalised loss to back-propagate (see ``trainer.model.diffusion.masked_diffusion_loss``)."""
    weighted_ce_sum: torch.Tensor
    """Detached sum of ``loss_weight * CE`` over masked tokens."""
    ce_sum: torch.Tensor
    """Detached sum of the plain CE over masked tokens."""
    num_masked: torch.Tensor
    """Number of masked tokens in the micro-batch."""
    hidden_states: torch.Tensor
    """[B, L, H] final hidden states."""


def text_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every self-attention module of the language model (not the vision tower)."""
    language_model = _base(model).model.language_model
    return [layer.self_attn for layer in language_model.layers]


def set_text_causal(model: nn.Module, causal: bool) -> None:
    """Set ``text_config.is_causal`` and ``is_causal`` on every text attention module.

    docs/DESIGN.md §1: both flags, because transformers versions read different ones.
    """
    base = _base(model)
    base.config.text_config.is_causal = causal
    base.model.language_model.config.is_causal = causal  # the same object in 5.x; cheap if a copy
    for module in text_attention_modules(base):
        module.is_causal = causal


def ensure_mask_token(tokenizer: Any, num_embeddings: int) -> int:
    """Register ``<|mask|>`` in ``tokenizer`` if missing and return its id.

    For the Qwen vocabulary the id must be 151669 (the first free id after the published added
    tokens). The id must fit in the embedding (Qwen's has 151,936 rows).
    """
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if mask_id is None or mask_id == tokenizer.unk_token_id:
        tokenizer.add_tokens([MASK_TOKEN], special_tokens=True)
        mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if tokenizer.convert_tokens_to_ids(IM_START) == QWEN_IM_START_ID and mask_id != QWEN_MASK_TOKEN_ID:
        raise ValueError(
            f"{MASK_TOKEN} got id {mask_id} in a Qwen tokenizer, expected {QWEN_MASK_TOKEN_ID}: "
            "use the published Qwen3-VL tokenizer (or make-tiny's) without other added tokens"
        )
    if mask_id >= num_embeddings:
        raise ValueError(
            f"{MASK_TOKEN} id {mask_id} does not fit the embedding of {num_embeddings} rows: "
            "the model's vocabulary is too small for this tokenizer"
        )
    return int(mask_id)


def lora_target_regex(target_modules: Sequence[str]) -> str:
    """PEFT ``target_modules`` regex restricted to the language model's decoder layers."""
    if not target_modules:
        raise ValueError("lora target_modules is empty: name at least one, e.g. q_proj")
    names = "|".join(re.escape(name) for name in target_modules)
    return rf"model\.language_model\.layers\.\d+\.(?:.*\.)?(?:{names})"


def _dtype(module: nn.Module) -> torch.dtype:
    """Parameter dtype of ``module`` (PEFT wrappers have no ``.dtype``)."""
    return next(module.parameters()).dtype


def _tower_input(
    pixel_values: torch.Tensor, normaliser: PixelNormaliser | None, visual: nn.Module
) -> torch.Tensor:
    """What the vision tower reads: the loader's uint8 patches become the image processor's pixel
    values here, a batch at a time on its device; float pixel values (a processor's) pass through."""
    if pixel_values.dtype == torch.uint8:
        if normaliser is None:
            raise ValueError(
                "uint8 image patches need the model's image processor: build the model with "
                "build_mdlm_model, or pass image_processor= to assemble_mdlm_model"
            )
        pixel_values = normaliser(pixel_values)
    return pixel_values.to(_dtype(visual))


def _base(model: nn.Module) -> nn.Module:
    """The ``Qwen3VLForConditionalGeneration`` inside a PEFT model (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class MDLMLanguageModel(nn.Module):
    """The trainable half that goes into the DeepSpeed engine.

    Holds the language model (with LoRA and the trainable mask row), ``lm_head`` and, only when the
    vision tower is trained, ``visual``. Called as
    ``module(input_ids, position_ids, seq_ids, vision, ...)``:

    - without ``target_ids``: returns the final hidden states [B, L, H];
    - with ``target_ids``, ``masked`` and ``loss_weight`` (or ``targets``): returns an :class:`MDLMOutput`
      whose loss comes from :func:`trainer.model.diffusion.masked_diffusion_loss` (LM head only at masked positions).
    """

    def __init__(
        self,
        language_model: nn.Module,
        lm_head: nn.Module,
        *,
        backend: str,
        image_token_id: int,
        mask_token_id: int,
        visual: nn.Module | None = None,
        vision_config: Any = None,
        pixel_normaliser: PixelNormaliser | None = None,
    ) -> None:
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.visual = visual
        self.backend = backend
        self.image_token_id = image_token_id
        self.mask_token_id = mask_token_id
        self.vision_config = vision_config
        self.pixel_normaliser = pixel_normaliser

    # -- vision inside the engine (train_vision / train_merger only) --------------------------

    def _blank_image(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vision_config
        merge = cfg.spatial_merge_size
        grid_thw = torch.tensor([[1, merge, merge]], device=device)  # one merged token, 32x32 px
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        return torch.zeros(merge * merge, patch_dim, device=device), grid_thw

    def _encode_images(
        self, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None, device: torch.device
    ) -> tuple[VisionFeatures | None, torch.Tensor]:
        """Run the trainable vision tower; returns (features or None, a zero that depends on it)."""
        assert self.visual is not None
        blank = pixel_values is None
        if blank:
            # Every rank runs the vision tower on every step so ZeRO-3 gathers the same parameters
            # everywhere; a text-only batch runs it on a blank image and adds an exact zero.
            pixel_values, image_grid_thw = self._blank_image(device)
        pixels = _tower_input(pixel_values, self.pixel_normaliser, self.visual)
        out = self.visual(pixels, grid_thw=image_grid_thw, return_dict=True)
        features = VisionFeatures(out.pooler_output, list(out.deepstack_features))
        zero = 0.0 * (features.image_embeds.sum() + sum(d.sum() for d in features.deepstack))
        return (None if blank else features), zero

    # -- the language model ------------------------------------------------------------------

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: torch.Tensor,
        vision: VisionFeatures | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Final hidden states [B, L, H] of the bidirectional text model over packed rows.

        ``input_ids`` [B, L], ``position_ids`` [3, B, L] (M-RoPE, per sub-sequence), ``seq_ids`` [B, L]
        (-1 = padding). ``vision`` holds the image features in row-major order of the ``<|image_pad|>``
        tokens; pass ``pixel_values``/``image_grid_thw`` instead when this module owns the vision tower.
        """
        zero = None
        if self.visual is not None:
            if vision is not None:
                raise ValueError("this model trains its vision tower: pass pixel_values, not vision features")
            vision, zero = self._encode_images(pixel_values, image_grid_thw, input_ids.device)
        elif pixel_values is not None:
            raise ValueError(
                "the vision tower is frozen: compute MDLMModel.vision_features first, pass vision="
            )

        embed = self.language_model.get_input_embeddings()
        inputs_embeds_BLH = embed(input_ids)
        image_mask_BL = input_ids == self.image_token_id
        visual_pos_masks = None
        deepstack = None
        # Asserted on the device, never read back (no host sync per micro-batch): the loader already
        # checked every sample's <|image_pad|> count against its grids on the host.
        if vision is not None:
            torch._assert_async(
                image_mask_BL.sum() == vision.image_embeds.shape[0],
                f"the batch's <|image_pad|> tokens and the {vision.image_embeds.shape[0]} rows of vision "
                "features differ: image_grid_thw and input_ids disagree",
            )
            image_embeds = vision.image_embeds.to(inputs_embeds_BLH.device, inputs_embeds_BLH.dtype)
            mask_BLH = image_mask_BL[..., None].expand_as(inputs_embeds_BLH)
            inputs_embeds_BLH = inputs_embeds_BLH.masked_scatter(mask_BLH, image_embeds)
            visual_pos_masks = image_mask_BL
            deepstack = [d.to(inputs_embeds_BLH.device, inputs_embeds_BLH.dtype) for d in vision.deepstack]
        else:
            torch._assert_async(
                ~image_mask_BL.any(), "the batch has <|image_pad|> tokens but no vision features"
            )

        packed = attention.prepare_packed_attention(seq_ids, self.backend, cu_seqlens, max_seqlen)
        out = self.language_model(
            inputs_embeds=inputs_embeds_BLH,
            position_ids=position_ids,
            attention_mask=None,
            use_cache=False,
            visual_pos_masks=visual_pos_masks,
            deepstack_visual_embeds=deepstack,
            **{attention.KWARG: packed},
        )
        hidden_BLH = out.last_hidden_state
        return hidden_BLH if zero is None else hidden_BLH + zero.to(hidden_BLH.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: torch.Tensor,
        vision: VisionFeatures | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        target_ids: torch.Tensor | None = None,
        masked: torch.Tensor | None = None,
        loss_weight: torch.Tensor | None = None,
        shift: bool = False,
        answer_mask: torch.Tensor | None = None,
        targets: diffusion.MaskedTargets | None = None,
        num_normalizer: float | torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        chunk_size: int | None = 1024,
        checkpoint_chunks: bool = True,
        fused_ce: diffusion.FusedLinearCE | None = None,
    ) -> torch.Tensor | MDLMOutput:
        """Hidden states [B, L, H], or with targets the MDLM loss (:class:`MDLMOutput`).

        ``input_ids`` are the noisy ids (masked tokens replaced), ``target_ids`` the clean ones;
        ``masked``/``loss_weight``/``answer_mask`` [B, L], or ``targets`` (:func:`trainer.model.diffusion.gather_masked`,
        on the host: no device sync); the rest as in :func:`trainer.model.diffusion.masked_diffusion_loss`.
        """
        hidden_BLH = self.hidden_states(
            input_ids,
            position_ids,
            seq_ids,
            vision,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
        )
        if targets is None and target_ids is None:
            return hidden_BLH
        if targets is None and (masked is None or loss_weight is None):
            raise ValueError(
                "target_ids needs masked and loss_weight (see trainer.model.diffusion.apply_masking)"
            )
        if targets is None:
            targets = diffusion.gather_masked(
                target_ids, masked, loss_weight, shift=shift, seq_ids_BL=seq_ids
            )
        result = diffusion.masked_diffusion_loss(
            hidden_BLH, self.lm_head, targets, mask_token_id=self.mask_token_id, num_normalizer=num_normalizer,
            answer_mask_BL=answer_mask, chunk_size=chunk_size, checkpoint_chunks=checkpoint_chunks, fused_ce=fused_ce,
        )  # fmt: skip
        return MDLMOutput(
            loss=result.loss,
            weighted_ce_sum=result.weighted_ce_sum,
            ce_sum=result.ce_sum,
            num_masked=result.num_masked,
            hidden_states=hidden_BLH,
        )

    def logits_at(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: torch.Tensor,
        positions: torch.Tensor,
        vision: VisionFeatures | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        shift: bool = False,
    ) -> torch.Tensor:
        """Float logits [N, V] at the True entries of ``positions`` [B, L] (row-major), mask logit -inf."""
        hidden_BLH = self.hidden_states(
            input_ids, position_ids, seq_ids, vision, pixel_values=pixel_values, image_grid_thw=image_grid_thw
        )
        return diffusion.logits_at_positions(
            hidden_BLH,
            positions,
            self.lm_head,
            mask_token_id=self.mask_token_id,
            shift=shift,
            seq_ids_BL=seq_ids,
        )


class MDLMModel:
    """The assembled model: frozen vision tower outside the engine + :class:`MDLMLanguageModel`."""

    def __init__(
        self,
        peft_model: nn.Module,
        tokenizer: Any,
        mask_token_id: int,
        engine_module: MDLMLanguageModel,
        backend: str,
        use_lora: bool,
    ) -> None:
        self.peft_model = peft_model
        """The PEFT model wrapping the whole stock Qwen3VLForConditionalGeneration (the base model
        itself when ``use_lora=False``); ``save_pretrained`` on it writes a standard adapter."""
        self.tokenizer = tokenizer
        self.mask_token_id = mask_token_id
        self.engine_module = engine_module
        self.backend = backend
        self.use_lora = use_lora
        self.processor: Any = None
        """The processor of the model folder when `build_mdlm_model` loaded it (tokenizer = `tokenizer`)."""

    @property
    def base_model(self) -> nn.Module:
        """The stock ``Qwen3VLForConditionalGeneration`` (shared with ``peft_model``)."""
        return _base(self.peft_model)

    @property
    def language(self) -> MDLMLanguageModel:
        """Alias of ``engine_module`` (the name CONTRACTS.md uses)."""
        return self.engine_module

    @property
    def config(self) -> Any:
        """The ``Qwen3VLConfig`` (text side bidirectional)."""
        return self.base_model.config

    @property
    def visual(self) -> nn.Module:
        """The vision tower (frozen unless train_vision/train_merger)."""
        return self.base_model.model.visual

    def set_attention(self, attn_implementation: str) -> None:
        """Switch the language model's packed attention backend (e.g. flex for training, sdpa to check)."""
        backend = attention.normalize_backend(attn_implementation)
        attention.register_attention_backends()
        self.base_model.set_attn_implementation({"text_config": attention.attn_implementation_name(backend)})
        self.engine_module.backend = backend
        self.backend = backend

    def compile_language_layers(self, backend: Any = "inductor") -> None:
        """``torch.compile`` each decoder layer on its own (``model.compile``): one compilation serves all
        layers (shared code), the rest stays eager; a new packed length recompiles once, then it is dynamic."""
        for layer in self.base_model.model.language_model.layers:
            layer.compile(backend=backend)

    @torch.no_grad()
    def vision_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionFeatures:
        """Run the vision tower without gradients (``no_grad``, not ``inference_mode``, so its outputs
        may enter the language model's autograd graph)."""
        visual = self.visual
        pixels = _tower_input(pixel_values, self.engine_module.pixel_normaliser, visual)
        out = visual(pixels, grid_thw=image_grid_thw, return_dict=True)
        return VisionFeatures(out.pooler_output, list(out.deepstack_features))

    def parameter_counts(self) -> dict[str, int]:
        """Unique parameters of the language model (embeddings and head, tied counted once, no LoRA),
        of the vision side, and of everything trainable."""
        base = self.base_model

        def unique(params: Any, keep: Any = lambda name, p: True) -> int:
            seen: dict[int, int] = {}
            for name, p in params:
                if keep(name, p):
                    seen[id(p)] = p.numel()
            return sum(seen.values())

        def stock(name: str, p: nn.Parameter) -> bool:
            return "lora_" not in name and "trainable_tokens" not in name and "modules_to_save" not in name

        language = unique(
            [*base.model.language_model.named_parameters(), *base.lm_head.named_parameters()], stock
        )
        vision = unique(base.model.visual.named_parameters(), stock)
        trainable = unique(self.peft_model.named_parameters(), lambda name, p: p.requires_grad)
        return {"language_model": language, "vision": vision, "trainable": trainable}


def _enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing: works with frozen inputs (no enable_input_require_grads)
    and with ZeRO-3; `activation_checkpointing_enable` is the name in newer transformers 5.x."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def assemble_mdlm_model(
    model: nn.Module,
    tokenizer: Any,
    model_config: ModelConfig | None = None,
    lora: LoraConfig | None = None,
    *,
    image_processor: Any = None,
) -> MDLMModel:
    """Turn a loaded stock ``Qwen3VLForConditionalGeneration`` into an :class:`MDLMModel` (in place).

    Also used on the meta device (``benchmarks/param_counts.py``), so it reads no weights.
    ``model_config`` (attention backend, what trains besides the language model) and ``lora`` are the
    trainer's config sections (defaults when None; ``attn_implementation="auto"`` resolves to the best
    backend installed). ``lora.enabled=False`` trains the whole language model; with
    ``model_config.train_embeddings=False`` its [V, H] embedding and tied head stay frozen but for
    the ``<|mask|>`` row. ``image_processor`` (the loader's) lets the vision path take the loader's uint8
    patches; without it only float pixel values are accepted.
    """
    model_config = model_config or ModelConfig()
    lora = lora or LoraConfig()
    backend = attention.resolve_backend(model_config.attn_implementation, torch.cuda.is_available())
    use_lora = lora.enabled
    train_vision, train_merger = not model_config.freeze_vision, not model_config.freeze_merger
    attention.register_attention_backends()
    vision_impl = {"flash": "flash_attention_2", "eager": "eager"}.get(backend, "sdpa")
    model.set_attn_implementation(
        {"text_config": attention.attn_implementation_name(backend), "vision_config": vision_impl}
    )
    set_text_causal(model, False)

    mask_id = ensure_mask_token(tokenizer, model.get_input_embeddings().num_embeddings)

    model.requires_grad_(False)
    vision_modules: list[str] = []
    if train_vision:
        vision_modules = ["model.visual"]
    elif train_merger:
        # One entry per deepstack merger: PEFT cannot save a ModuleList as a whole.
        num_deepstack = len(model.model.visual.deepstack_merger_list)
        vision_modules = ["model.visual.merger"]
        vision_modules += [f"model.visual.deepstack_merger_list.{i}" for i in range(num_deepstack)]

    if model_config.gradient_checkpointing:
        _enable_checkpointing(model)

    if use_lora:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        lora_config = PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora_target_regex(lora.target_modules),
            trainable_token_indices={"embed_tokens": [mask_id]},
            # A trained vision part is saved whole in the adapter (PEFT modules_to_save).
            modules_to_save=vision_modules or None,
            bias="none",
        )
        with quiet_peft_wrapping():
            peft_model = get_peft_model(model, lora_config)
        use_sparse_trainable_tokens(peft_model)
    elif model_config.train_embeddings:
        peft_model = model
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        for name in vision_modules:
            model.get_submodule(name).requires_grad_(True)
    else:
        # The whole language model but its [V, H] embedding and head, which stay frozen but for the
        # <|mask|> row (PEFT trainable tokens, as with LoRA): far less optimizer state and gradient
        # traffic, and a checkpoint that still exports as a standard folder.
        from peft import TrainableTokensConfig, get_peft_model

        with quiet_peft_wrapping():
            peft_model = get_peft_model(
                model, TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[mask_id])
            )
        use_sparse_trainable_tokens(peft_model)
        language = model.model.language_model
        language.layers.requires_grad_(True)
        language.norm.requires_grad_(True)
        for name in vision_modules:
            model.get_submodule(name).requires_grad_(True)

    engine_module = MDLMLanguageModel(
        model.model.language_model,
        model.lm_head,
        backend=backend,
        image_token_id=int(model.config.image_token_id),
        mask_token_id=mask_id,
        visual=model.model.visual if vision_modules else None,
        vision_config=model.config.vision_config,
        pixel_normaliser=PixelNormaliser(image_processor) if image_processor is not None else None,
    )
    return MDLMModel(peft_model, tokenizer, mask_id, engine_module, backend, use_lora)


def build_mdlm_model(
    model_config: ModelConfig, lora: LoraConfig | None = None, *, dtype: torch.dtype | str = torch.bfloat16
) -> MDLMModel:
    """Load Qwen3-VL from ``model_config.name_or_path`` in ``dtype`` and assemble it as the config
    sections say (see :func:`assemble_mdlm_model`); training, export and generation all build here."""
    from transformers import Qwen3VLForConditionalGeneration

    from trainer.model.processor import load_processor

    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}: use bfloat16, float16 or float32")
        dtype = getattr(torch, dtype)
    # Fail on a bad attention name before loading gigabytes.
    attention.resolve_backend(model_config.attn_implementation, torch.cuda.is_available())
    # The processor the loader builds from the same folder: its tokenizer, and its image processor for
    # the uint8 patches.
    processor = load_processor(model_config.name_or_path)
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        model_config.name_or_path, dtype=dtype, attn_implementation="sdpa"
    )
    mdlm = assemble_mdlm_model(
        model, processor.tokenizer, model_config, lora, image_processor=processor.image_processor
    )
    mdlm.processor = processor
    return mdlm
