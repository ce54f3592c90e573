"""The model room (pure: no deepspeed, no torch.distributed): Qwen3-VL as a masked diffusion LM.

- `assemble`: model assembly from ModelConfig + LoraConfig (`build_mdlm_model`, `assemble_mdlm_model`,
  `MDLMModel`), re-exported here: ``from trainer.model import MDLMModel, build_mdlm_model``.
- `attention`: packed bidirectional attention backends; `diffusion`: the MDLM math.
- `positions`: M-RoPE position ids; `pixels`: uint8 patches -> pixel values; `tokens`: special tokens;
  `peft_tokens`: PEFT trainable tokens for the <|mask|> row.
- `tokenizer`: the offline Qwen tokenizer and chat template; `processor`: the Qwen3-VL processor;
  `tiny`: tiny random models (`make-tiny`).
"""

from trainer.model.assemble import (
    QWEN_IM_START_ID,
    QWEN_MASK_TOKEN_ID,
    MDLMLanguageModel,
    MDLMModel,
    MDLMOutput,
    VisionFeatures,
    assemble_mdlm_model,
    build_mdlm_model,
    ensure_mask_token,
    lora_target_regex,
    set_text_causal,
    text_attention_modules,
)

__all__ = [
    "QWEN_IM_START_ID",
    "QWEN_MASK_TOKEN_ID",
    "MDLMLanguageModel",
    "MDLMModel",
    "MDLMOutput",
    "VisionFeatures",
    "assemble_mdlm_model",
    "build_mdlm_model",
    "ensure_mask_token",
    "lora_target_regex",
    "set_text_causal",
    "text_attention_modules",
]
