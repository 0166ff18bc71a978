"""Prompt tuning (CoOp, Zhou et al. 2022): learn the words in front of the class prompts, not the model.

The text each class is scored against becomes

    [SOS] ctx_1 ... ctx_M <tokens of the class prompt> [EOS]

where ctx_1..M (`prompt_ctx`, [M, text hidden]) are free vectors in CLIP's token-embedding space,
shared by both classes (CoOp's unified context). The class texts are the zero-shot model's two
prompts (`real_prompt`, `ai_prompt`), not bare class names: they are what a user configures for
zero-shot, so tuning starts from the same wording, and a class name like "real" alone says little.
Everything of CLIP stays frozen; only `prompt_ctx` trains, typically with a high learning rate
(the seed uses 1e-2), which is why it is named outside `backbone`: the Trainer's backbone
learning-rate scale must not touch it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds_trainer.errors import ConfigError
from ds_trainer.models.clip import CLIPModel


def encode_text_embeddings(text_model: nn.Module, inputs_embeds: torch.Tensor, pool_at: torch.Tensor) -> torch.Tensor:
    """`CLIPTextModel`'s forward from token embeddings [N, L, H] instead of ids: the pooled states [N, H].

    transformers' text model only takes `input_ids` (it finds the EOS by id), so this repeats its
    steps: add position embeddings, run the encoder under the causal mask, final layer norm, and
    take the hidden state at `pool_at` (the EOS position of each sequence, [N]).
    """
    from transformers.masking_utils import create_causal_mask

    hidden = text_model.embeddings(inputs_embeds=inputs_embeds)
    mask = create_causal_mask(config=text_model.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None)
    out = text_model.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
    last = text_model.final_layer_norm(out.last_hidden_state)
    return last[torch.arange(last.shape[0], device=last.device), pool_at.to(last.device)]


class PromptTuningWrapper(nn.Module):
    """A zero-shot `CLIPModel` whose prompts get `prompt_length` learnable context vectors (CoOp).

    Trainable: `prompt_ctx` only (initialised N(0, 0.02), as in CoOp). The wrapped model is frozen
    and sits under `model.`, so its weights are `model.backbone.*`. Logits are [B, 2] like the
    zero-shot model's: column 0 = real prompt, column 1 = ai prompt.
    """

    def __init__(self, model: CLIPModel, prompt_length: int = 10) -> None:
        super().__init__()
        if not isinstance(model, CLIPModel) or model.mode != "zero-shot":
            got = f"mode {model.mode!r}" if isinstance(model, CLIPModel) else type(model).__name__
            raise ConfigError(
                f"model.mode: PromptTuningWrapper needs CLIPModel(mode='zero-shot') (it tunes the text prompts), "
                f"got {got}; build the base model with mode='zero-shot'"
            )
        if not isinstance(prompt_length, int) or prompt_length < 1:
            raise ConfigError(f"model.prompt_length: must be a positive integer, got {prompt_length!r}")
        self.model = model
        self.prompt_length = prompt_length
        model.requires_grad_(False)
        hidden = model.backbone.config.text_config.hidden_size
        dtype = model.backbone.text_model.embeddings.token_embedding.weight.dtype
        self.prompt_ctx = nn.Parameter(torch.empty(prompt_length, hidden, dtype=dtype).normal_(std=0.02))
        model.tokenize_prompts(reserve=prompt_length)  # a prompt too long for the context fails now, not mid-run

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def model_name(self) -> str:
        return self.model.model_name

    @property
    def mode(self) -> str:
        return "prompt-tuning"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.similarity_logits(self.model.encode_images(pixel_values), self.encode_prompts())

    def encode_prompts(self) -> torch.Tensor:
        """L2-normalised text embeddings of the two context-prefixed prompts [2, projection_dim]."""
        ids, eos = self.model.tokenize_prompts(reserve=self.prompt_length)
        backbone = self.model.backbone
        tokens = backbone.text_model.embeddings.token_embedding(ids)
        ctx = self.prompt_ctx.to(tokens.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1)
        # Context goes right after [SOS]; the EOS moves right by prompt_length.
        embeds = torch.cat([tokens[:, :1], ctx, tokens[:, 1:]], dim=1)
        pooled = encode_text_embeddings(backbone.text_model, embeds, eos + self.prompt_length)
        return F.normalize(backbone.text_projection(pooled), dim=-1)

    def extra_repr(self) -> str:
        return f"prompt_length={self.prompt_length}"
