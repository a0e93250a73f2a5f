"""A zoo of real architectures built from ``transformers`` configs (tiny sizes, nothing downloaded),
for end-to-end tests of the torch probe (``tests/e2e/test_zoo.py``).

Each :class:`Animal` builds its model with a fixed seed, in training mode, with activation
checkpointing on where the model supports it, and makes batches whose labels let the model compute
its own loss (``model(**batch).loss``). Dropout, LayerDrop and SpecAugment keep their default
rates: the random draws they make are part of what must stay unchanged under the probe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

__all__ = ["ZOO", "Animal"]

VOCAB = 64
BATCH = 2
TOKENS = 8


@dataclass(frozen=True)
class Animal:
    """One architecture of the zoo.

    ``watch`` is a ``Linear`` the test checks values of: its weights, and its activations, which
    (where ``checkpointed``) activation checkpointing recomputes in backward.
    """

    name: str
    build: Callable[[Any], nn.Module]  # transformers module -> model (untrained, any mode)
    inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]
    watch: str
    checkpoint_kwargs: dict[str, Any] | None = field(default_factory=lambda: {"use_reentrant": False})  # None: off

    @property
    def checkpointed(self) -> bool:
        return self.checkpoint_kwargs is not None

    def model(self) -> nn.Module:
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        model = self.build(transformers)
        model.train()
        if self.checkpoint_kwargs is not None:
            assert model.supports_gradient_checkpointing, self.name
            kwargs = dict(self.checkpoint_kwargs)
            if hasattr(model, "activation_checkpointing_enable"):  # gradient_checkpointing_enable's new name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return model

    def batches(self, steps: int) -> list[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(1)
        return [self.inputs(gen) for _ in range(steps)]


def _ids(gen: torch.Generator, length: int = TOKENS, low: int = 0, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(low, high, (BATCH, length), generator=gen)


def _causal(gen: torch.Generator) -> dict[str, torch.Tensor]:
    ids = _ids(gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _classified(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(gen), "labels": torch.randint(0, 3, (BATCH,), generator=gen)}


def _seq2seq(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(gen), "labels": _ids(gen, length=6)}


def _images(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=gen),
            "labels": torch.randint(0, 3, (BATCH,), generator=gen)}


def _speech(gen: torch.Generator) -> dict[str, torch.Tensor]:
    # 400 samples -> 39 frames after the two strided convolutions; CTC targets avoid the blank (0).
    return {"input_values": torch.randn(BATCH, 400, generator=gen), "labels": _ids(gen, length=5, low=1, high=16)}


def _bert(t: Any) -> nn.Module:
    return t.BertForSequenceClassification(t.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3))


def _llama(t: Any) -> nn.Module:
    return t.LlamaForCausalLM(t.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=32))


def _t5(t: Any) -> nn.Module:
    return t.T5ForConditionalGeneration(t.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0))


def _vit(t: Any) -> nn.Module:
    return t.ViTForImageClassification(t.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3))


def _resnet(t: Any) -> nn.Module:
    return t.ResNetForImageClassification(t.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3))


def _wav2vec2(t: Any) -> nn.Module:
    # The positional convolution is weight-normed through torch.nn.utils.parametrize.
    return t.Wav2Vec2ForCTC(t.Wav2Vec2Config(
        vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4, ctc_loss_reduction="mean"))


def _mixtral(t: Any) -> nn.Module:
    # The loss includes the router's load-balancing loss.
    return t.MixtralForCausalLM(t.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        output_router_logits=True))


ZOO: dict[str, Animal] = {a.name: a for a in (
    Animal("bert", _bert, _classified, "bert.encoder.layer.0.attention.self.query"),
    Animal("llama", _llama, _causal, "model.layers.0.self_attn.q_proj", {"use_reentrant": True}),
    Animal("t5", _t5, _seq2seq, "encoder.block.0.layer.0.SelfAttention.q"),
    Animal("vit", _vit, _images, "vit.layers.0.attention.q_proj"),
    Animal("resnet", _resnet, _images, "classifier.1", None),  # ResNet does not support checkpointing
    Animal("wav2vec2", _wav2vec2, _speech, "wav2vec2.encoder.layers.0.attention.q_proj"),
    Animal("mixtral", _mixtral, _causal, "model.layers.0.self_attn.q_proj"),
)}
