"""The text tower's encoder: BERT (MiniLM, PubMedBERT, BiomedBERT...) in plain torch.

Importing transformers' BertModel costs about 5 s on this CPU (it pulls in torch._dynamo and generation code),
paid on every app start and every CLI call. The forward pass of a BERT encoder is short, so it lives here.
Parameter names are transformers' (a checkpoint's ``model.safetensors`` or ``pytorch_model.bin`` loads as it
is, and saved M3Bind models keep their keys); the tokenizer is the checkpoint's own ``tokenizer.json`` (or its
``vocab.txt``) run by the ``tokenizers`` package. ``tests/test_bert.py`` checks both against transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclass(frozen=True)
class BertSpec:
    """The architecture, read from a checkpoint's ``config.json``."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_dir(cls, directory: Path) -> "BertSpec":
        raw = json.loads((directory / "config.json").read_text())
        if raw.get("model_type") != "bert" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"The text tower reads BERT encoders with absolute positions; {directory} holds "
                              f"a {raw.get('model_type')!r} model.")
        if raw.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ConfigError(f"Unsupported activation {raw['hidden_act']!r} in {directory}/config.json.")
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__ if name in raw})


class _Embeddings(nn.Module):
    def __init__(self, spec: BertSpec):
        super().__init__()
        self.word_embeddings = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.position_embeddings = nn.Embedding(spec.max_position_embeddings, spec.hidden_size)
        self.token_type_embeddings = nn.Embedding(spec.type_vocab_size, spec.hidden_size)
        self.LayerNorm = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.dropout = nn.Dropout(spec.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) \
            + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class _SelfAttention(nn.Module):
    def __init__(self, spec: BertSpec):
        super().__init__()
        self.heads, self.dropout = spec.num_attention_heads, spec.attention_probs_dropout_prob
        self.query, self.key, self.value = (nn.Linear(spec.hidden_size, spec.hidden_size) for _ in range(3))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, h // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, t, h)


class _AddNorm(nn.Module):
    """A projection, dropout, and the residual added before the layer norm."""

    def __init__(self, spec: BertSpec, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, spec.hidden_size)
        self.LayerNorm = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.dropout = nn.Dropout(spec.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, spec: BertSpec):
        super().__init__()
        self.self = _SelfAttention(spec)  # transformers' name, so checkpoints load as they are
        self.output = _AddNorm(spec, spec.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class _Intermediate(nn.Module):
    def __init__(self, spec: BertSpec):
        super().__init__()
        self.dense = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.act = _ACTIVATIONS[spec.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, spec: BertSpec):
        super().__init__()
        self.attention = _Attention(spec)
        self.intermediate = _Intermediate(spec)
        self.output = _AddNorm(spec, spec.intermediate_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, spec: BertSpec):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(spec) for _ in range(spec.num_hidden_layers))


class BertEncoder(nn.Module):
    """Token ids -> the last layer's hidden states (B, T, hidden_size); no pooler (the tower pools itself)."""

    def __init__(self, spec: BertSpec):
        super().__init__()
        self.spec = spec
        self.embeddings = _Embeddings(spec)
        self.encoder = _Encoder(spec)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        keep = attention_mask.bool()[:, None, None, :]  # padded tokens are never attended to
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


def checkpoint_state(directory: Path, encoder: BertEncoder) -> dict[str, torch.Tensor]:
    """A checkpoint's weights under this encoder's names (a ``bert.`` prefix and old LayerNorm ``gamma``/``beta``
    names are undone; heads and poolers the encoder does not have are left out)."""
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        raw = load_file(str(directory / "model.safetensors"))
    elif (directory / "pytorch_model.bin").is_file():
        raw = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"{directory} has no model.safetensors or pytorch_model.bin.")
    wanted = encoder.state_dict()
    state = {}
    for key, tensor in raw.items():
        key = key.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                                             "LayerNorm.bias")
        if key in wanted:
            state[key] = tensor.to(wanted[key].dtype)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ConfigError(f"The BERT checkpoint in {directory} lacks {missing[:3]}.")
    return state


def load_tokenizer(directory: Path, max_length: int):
    """The checkpoint's tokenizer, padding to the longest text and truncating at ``max_length`` tokens."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    elif (directory / "vocab.txt").is_file():
        settings = directory / "tokenizer_config.json"
        lower = json.loads(settings.read_text()).get("do_lower_case", True) if settings.is_file() else True
        tokenizer = BertWordPieceTokenizer(str(directory / "vocab.txt"), lowercase=lower)
    else:
        raise ConfigError(f"{directory} has no tokenizer.json or vocab.txt.")
    pad = tokenizer.token_to_id("[PAD]")
    tokenizer.no_padding()
    tokenizer.enable_padding(pad_id=0 if pad is None else pad, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length)
    return tokenizer


def tokenize(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """What ``BertEncoder.forward`` takes: ids, attention mask and token types, as int64 tensors."""
    encodings = tokenizer.encode_batch(list(texts))
    return {"input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.long)}
