"""The Gemma 4 causal LM on megatron-core: scaled tied embeddings, decoder layers, final norm, softcapped logits.

Forward takes explicit `position_ids` and `document_ids` [b, s], so packed rows (several documents in one
row, positions restarting per document) attend only within their document, with windows measured in
positions. The model's attention backend (`gemma4_support.attention.backends`, given at construction:
dense, flex, or context parallelism around either) prepares one mask per distinct window BEFORE the layers,
and each layer looks its own up by its window (None = global) and attends through the same backend.
Megatron layout inside: [s, b, h]; logits come back batch-first [b, s, vocab] like GPTModel's.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from torch import nn

from gemma4_support.attention.backends import AttentionBackend
from gemma4_support.attention.masks import MaskLookup
from gemma4_support.config.spec import ModelSpec
from gemma4_support.errors import ConfigError
from gemma4_support.model.config import layer_config
from gemma4_support.model.layer import Gemma4DecoderLayer
from gemma4_support.model.norm import Gemma4RMSNorm
from gemma4_support.model.rope import RotaryPair


class Gemma4Embedding(nn.Module):
    """Token embedding x sqrt(hidden) (the scale cast to the weight dtype, as HF does). Like HF's
    `padding_idx`, the pad token's row receives no gradient from lookups (the tied output layer still
    trains it)."""

    def __init__(self, config: TransformerConfig, vocab_size: int, pad_token_id: int | None = None) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(vocab_size, config.hidden_size, init_method=config.init_method,
                                                      config=config, tp_group=parallel_state.get_tensor_model_parallel_group())
        self.scale = config.hidden_size ** 0.5
        self.pad_token_id = pad_token_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] -> embeddings [s, b, h]."""
        emb = self.word_embeddings(input_ids)
        if self.pad_token_id is not None:
            emb = torch.where((input_ids == self.pad_token_id).unsqueeze(-1), emb.detach(), emb)
        # HF's scale, rounded to the weight dtype, as a Python number: a device tensor made from it is a host copy
        emb = emb * torch.tensor(self.scale, dtype=torch.float32).to(emb.dtype).item()
        return emb.transpose(0, 1).contiguous()


class Gemma4Decoder(MegatronModule):
    """The stack of decoder layers and the final RMSNorm."""

    def __init__(self, config: TransformerConfig, spec: ModelSpec, backend: AttentionBackend, tp_size: int) -> None:
        super().__init__(config=config)
        self.layers = nn.ModuleList(
            Gemma4DecoderLayer(layer_config(config, layer), layer, backend, tp_size) for layer in spec.layers
        )
        self.final_layernorm = Gemma4RMSNorm(config.hidden_size, config.layernorm_epsilon, dtype=config.params_dtype)


class Gemma4Model(MegatronModule):
    """Gemma 4 text model (causal LM) built from megatron-core modules, attending through `backend`."""

    def __init__(self, config: TransformerConfig, spec: ModelSpec, backend: AttentionBackend, tp_size: int = 1) -> None:
        super().__init__(config=config)
        self.spec = spec
        self.backend = backend
        self.embedding = Gemma4Embedding(config, spec.vocab_size, spec.pad_token_id)
        self.rotary = RotaryPair(spec)
        self.decoder = Gemma4Decoder(config, spec, backend, tp_size)
        self.tp_size = tp_size
        self.output_layer = ColumnParallelLinear(
            config.hidden_size, spec.vocab_size, config=config, init_method=config.init_method, bias=False,
            gather_output=True, skip_weight_param_allocation=spec.tie_word_embeddings,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
        )
        self.softcap = spec.final_logit_softcapping
        self.windows = sorted({layer.window for layer in spec.layers}, key=lambda w: (w is None, w or 0))
        self.recompute_layers = 0  # the first N decoder layers recompute their activations in backward (set_recompute)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, document_ids: torch.Tensor,
                masks: MaskLookup | None = None, branch_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input/position/document ids [b, s] -> logits [b, s, vocab] (softcapped). `branch_ids` [b, s] marks
        shared-prefix packing (0 = a document's prompt, k = its k-th completion, which never sees a sibling).
        `masks`: prepared ahead by the backend (default: prepared here, before the layers)."""
        hidden = self.hidden_states(input_ids, position_ids, document_ids, masks, branch_ids)
        return self.logits(hidden).transpose(0, 1).contiguous()

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, document_ids: torch.Tensor,
                      masks: MaskLookup | None = None, branch_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed hidden states [s, b, h] that `logits` turns into the vocabulary (arguments as forward)."""
        if masks is None:
            masks = self.backend.prepare(position_ids, document_ids, self.windows, branch_ids)
        rotary = self.rotary(position_ids)
        hidden = self.embedding(input_ids)
        recompute = torch.is_grad_enabled() and self.recompute_layers
        for i, layer in enumerate(self.decoder.layers):
            args = (hidden, rotary[layer.layer.layer_type], masks.lookup(layer.window))
            hidden = layer.recomputed(*args) if recompute and i < recompute else layer(*args)
        return self.decoder.final_layernorm(hidden)

    def head_weight(self) -> torch.Tensor | None:
        """The [vocab, h] output weight when `logits` is exactly softcap(hidden @ weightᵀ) (one tensor-parallel rank,
        no bias, no hook on the output layer), else None: what a fused log-prob may use in place of `logits`."""
        layer = self.output_layer
        if self.tp_size > 1 or getattr(layer, "bias", None) is not None or layer._forward_hooks or layer._forward_pre_hooks:
            return None
        return self.embedding.word_embeddings.weight if self.spec.tie_word_embeddings else layer.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., h] (any leading shape) -> softcapped logits [..., vocab] in the model's dtype."""
        weight = self.embedding.word_embeddings.weight if self.spec.tie_word_embeddings else None
        logits, _ = self.output_layer(hidden, weight=weight)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def set_recompute(model: Gemma4Model, layers: int | None, *, experts: bool = False) -> None:
    """Recompute activations in backward instead of storing them: the first `layers` decoder layers whole (None:
    every layer; 0: none; Megatron's full-granularity block method), and with `experts` the routed experts of every
    other MoE layer (Megatron's selective "moe" recompute: their [tokens·k, ·] tensors, most of a layer's activation
    memory, give way to their [tokens, h] input for one more experts forward)."""
    count = len(model.decoder.layers)
    layers = count if layers is None else layers
    if not 0 <= layers <= count:
        raise ConfigError(f"cannot recompute {layers} of the model's {count} decoder layers",
                          f"choose 0..{count} layers (None: all)")
    model.recompute_layers = layers
    for i, layer in enumerate(model.decoder.layers):
        if layer.is_moe:
            layer.moe.recompute = experts and i >= layers
