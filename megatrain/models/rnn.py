"""LSTM / GRU models (pure architecture, plain torch): a language model and a sequence classifier.

Both embed tokens into ``hidden_size`` and run a multi-layer ``nn.LSTM``/``nn.GRU`` (dropout between layers) of
``rnn_width`` units (``model.rnn_hidden_size``, default hidden_size; smaller after hidden-unit pruning).
The LM predicts the next token at every position, so it is unidirectional (a backward pass would read the
answer); its head may share the embedding matrix (``model.tie_embeddings``, Press & Wolf 2017). The classifier
may be bidirectional and classifies from the final hidden state of the top layer (both directions concatenated).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from megatrain.config.schema import ModelConfig
from megatrain.errors import UserError

_RNN = {"lstm": nn.LSTM, "gru": nn.GRU}


def _check(model_cfg: ModelConfig, vocab_size: int) -> None:
    if model_cfg.arch not in _RNN:
        raise UserError(f"model.arch={model_cfg.arch} is not an RNN; use arch: lstm or gru")
    if vocab_size <= 0:
        raise UserError("model.vocab_size is 0; set it or prepare data first so it is read from the tokenizer")


def _make_rnn(model_cfg: ModelConfig, *, bidirectional: bool) -> nn.RNNBase:
    # nn.LSTM applies dropout only between layers; it warns (and does nothing) with one layer.
    between = model_cfg.dropout if model_cfg.num_layers > 1 else 0.0
    return _RNN[model_cfg.arch](model_cfg.hidden_size, model_cfg.rnn_width, num_layers=model_cfg.num_layers,
                                dropout=between, batch_first=True, bidirectional=bidirectional)


def _init_rnn(rnn: nn.RNNBase, hidden: int) -> None:
    # torch's default U(-1/√H, 1/√H) is kept for the weights. LSTM forget-gate biases start at 1 so early
    # gradients flow through the cell state (Jozefowicz et al. 2015); torch stores gates as [i, f, g, o].
    if isinstance(rnn, nn.LSTM):
        for name, p in rnn.named_parameters():
            if name.startswith("bias_ih"):
                with torch.no_grad():
                    p.zero_()
                    p[hidden:2 * hidden].fill_(1.0)
            elif name.startswith("bias_hh"):
                with torch.no_grad():
                    p.zero_()


class RNNLanguageModel(nn.Module):
    def __init__(self, model_cfg: ModelConfig, vocab_size: int):
        super().__init__()
        _check(model_cfg, vocab_size)
        if model_cfg.bidirectional:
            raise UserError("model.bidirectional=true with task language_modeling would see future tokens; "
                             "set bidirectional: false (it is for classification)")
        self.embed = nn.Embedding(vocab_size, model_cfg.hidden_size)
        self.drop = nn.Dropout(model_cfg.dropout)
        self.rnn = _make_rnn(model_cfg, bidirectional=False)
        self.lm_head = nn.Linear(model_cfg.rnn_width, vocab_size, bias=False)
        self.tied = model_cfg.tied
        if self.tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> logits (B, T, V)
        x = self.drop(self.embed(input_ids))  # (B, T, E)
        h, _ = self.rnn(x)  # (B, T, H)
        return self.lm_head(self.drop(h))

    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied weight counts once)."""
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        return n - self.embed.weight.numel() if exclude_embeddings else n


class RNNClassifier(nn.Module):
    def __init__(self, model_cfg: ModelConfig, vocab_size: int):
        super().__init__()
        _check(model_cfg, vocab_size)
        self.num_directions = 2 if model_cfg.bidirectional else 1
        self.embed = nn.Embedding(vocab_size, model_cfg.hidden_size)
        self.drop = nn.Dropout(model_cfg.dropout)
        self.rnn = _make_rnn(model_cfg, bidirectional=model_cfg.bidirectional)
        self.fc = nn.Linear(model_cfg.rnn_width * self.num_directions, model_cfg.num_classes)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids, optional (B,) true lengths of right-padded rows -> logits (B, num_classes)."""
        x = self.drop(self.embed(input_ids))  # (B, T, E)
        if lengths is not None:
            # packing makes the final state the one at each row's own last token, not at the padding
            x = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state  # (L·D, B, H); LSTM returns (h_n, c_n)
        top = h_n[-self.num_directions:]  # (D, B, H): forward (and backward) state of the top layer
        feats = top.transpose(0, 1).reshape(input_ids.shape[0], -1)  # (B, D·H)
        return self.fc(self.drop(feats))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init(model: nn.Module, model_cfg: ModelConfig) -> None:
    with torch.no_grad():
        model.embed.weight.normal_(0.0, model_cfg.init_std)  # small: a tied head starts near uniform logits
    _init_rnn(model.rnn, model_cfg.rnn_width)


def _build(cls, model_cfg: ModelConfig, vocab_size: int, seed: int | None):
    if seed is None:  # the caller seeded the global RNG
        model = cls(model_cfg, vocab_size)
        _init(model, model_cfg)
        return model
    with torch.random.fork_rng(devices=[]):  # a private stream: building never shifts the caller's RNG
        torch.manual_seed(seed)
        return _build(cls, model_cfg, vocab_size, None)


def build_rnn_lm(model_cfg: ModelConfig, vocab_size: int, *, seed: int | None = None) -> RNNLanguageModel:
    """LSTM/GRU language model: ``forward(input_ids (B, T)) -> logits (B, T, V)`` like the Transformer.
    ``seed=None`` draws the init from the global RNG (seed it first); an int uses a private stream."""
    return _build(RNNLanguageModel, model_cfg, vocab_size, seed)


def build_rnn_classifier(model_cfg: ModelConfig, vocab_size: int, *, seed: int | None = None) -> RNNClassifier:
    """LSTM/GRU sequence classifier: ``forward(input_ids (B, T), lengths=None) -> logits (B, C)``."""
    return _build(RNNClassifier, model_cfg, vocab_size, seed)
