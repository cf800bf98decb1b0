"""Text conditioning: prompts -> the embeddings a denoiser is conditioned on.

The same computation as diffusers' StableDiffusionPipeline.encode_prompt (CLIP last hidden
state) and StableDiffusion3Pipeline.encode_prompt (two CLIPs' penultimate hidden states side
by side, padded to the joint width, then the T5 slot as zeros when there is no T5; pooled
embeddings concatenated). Written out here so it runs on any backend's text encoder and once
per batch; the oracle test holds it to the pipelines' output. Text encoders come in as
component engines (engines.components), named tensors in and out. No inference_mode here: the
trainers backpropagate through the same code (tasks run it under inference_mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Conditioning:
    embeds: torch.Tensor  # [B, tokens, dim]
    pooled: torch.Tensor | None = None  # [B, dim] (MMDiT)
    # Channels concatenated to the denoiser's input (an inpainting UNet's mask and masked-image
    # latents, the x4 upscaler's low-res image): spatial conditioning, per row like the text.
    concat: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # [B] class labels (the x4 upscaler's noise level)

    def _fields(self) -> tuple:
        return self.embeds, self.pooled, self.concat, self.labels

    def select(self, index: torch.Tensor) -> "Conditioning":
        """The rows `index` picks (a bool mask or indices)."""
        return Conditioning(*(None if t is None else t[index] for t in self._fields()))

    def rows(self) -> list["Conditioning"]:
        """One Conditioning per row (each [tokens, dim] / [dim] / [C, h, w] / [])."""
        n = len(self.embeds)
        return [Conditioning(*(None if t is None else t[i] for t in self._fields())) for i in range(n)]

    def with_concat(self, concat: torch.Tensor, labels: torch.Tensor | None = None) -> "Conditioning":
        """This (one row's) conditioning with spatial channels (and a class label) for the denoiser."""
        return Conditioning(self.embeds, self.pooled, concat, labels)

    @staticmethod
    def stack(rows: list["Conditioning"]) -> "Conditioning":
        """The inverse of rows()."""
        columns = zip(*(r._fields() for r in rows))
        return Conditioning(*(None if c[0] is None else torch.stack(list(c)) for c in columns))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        columns = zip(*(p._fields() for p in parts))
        return Conditioning(*(None if c[0] is None else torch.cat(list(c)) for c in columns))


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_ldm(tokenizer, text_encoder, prompts: list[str]) -> Conditioning:
    """text_encoder: a `text_encoder` component engine (input_ids -> hidden_states)."""
    return Conditioning(text_encoder(input_ids=token_ids(tokenizer, prompts))["hidden_states"])


def encode_mmdit(
    tokenizers, text_encoders, prompts: list[str], joint_dim: int, t5_tokens: int
) -> Conditioning:
    """text_encoders: component engines (input_ids -> penultimate hidden_states, pooled)."""
    hidden, pooled = [], []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        out = encoder(input_ids=token_ids(tokenizer, prompts))
        pooled.append(out["pooled"])
        hidden.append(out["hidden_states"])
    clip = torch.cat(hidden, dim=-1)
    clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))
    t5_slot = clip.new_zeros(clip.shape[0], t5_tokens, joint_dim)
    return Conditioning(torch.cat([clip, t5_slot], dim=-2), torch.cat(pooled, dim=-1))
