"""ResNet and LSTM/GRU models: shapes, parameter counts against the closed forms, options, errors."""
import pytest
import torch

from megatrain.config import build_config
from megatrain.models.cnn import build_resnet
from megatrain.models.rnn import build_rnn_classifier, build_rnn_lm


def _model_cfg(**kw):
    return build_config({"model": kw}).model


def _basic_params(cin, widths, blocks, classes):
    n = 9 * cin * widths[0] + 2 * widths[0]  # stem conv + BN
    ch = widths[0]
    for i, (w, b) in enumerate(zip(widths, blocks)):
        for j in range(b):
            stride = 2 if i > 0 and j == 0 else 1
            n += 9 * ch * w + 2 * w + 9 * w * w + 2 * w
            if stride != 1 or ch != w:
                n += ch * w + 2 * w
            ch = w
    return n + ch * classes + classes


@pytest.mark.parametrize("widths,blocks", [([16, 32, 64], [1, 1, 1]), ([8, 16], [2, 3])])
def test_resnet_basic_shapes_and_params(widths, blocks):
    cfg = _model_cfg(arch="resnet", widths=widths, blocks_per_stage=blocks, num_classes=10, in_channels=1)
    model = build_resnet(cfg, seed=0)
    out = model(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, 10)
    assert model.num_params() == _basic_params(1, widths, blocks, 10)


def test_resnet_bottleneck_and_imagenet_stem():
    cfg = _model_cfg(arch="resnet", block="bottleneck", widths=[8, 16], blocks_per_stage=[1, 1], num_classes=5,
                     in_channels=3)
    model = build_resnet(cfg, seed=0, image_size=64)
    assert isinstance(model.stem[-1], torch.nn.MaxPool2d)  # 64 px -> ImageNet stem
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    assert model.num_features == 16 * 4
    assert build_resnet(cfg, seed=0, image_size=32)(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_resnet_seeded_and_identity_init():
    cfg = _model_cfg(arch="resnet")
    a, b = build_resnet(cfg, seed=3), build_resnet(cfg, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    state = torch.random.get_rng_state()
    build_resnet(cfg, seed=4)
    assert torch.equal(state, torch.random.get_rng_state())  # building does not shift the caller's RNG
    assert float(a.stages[0][0].bn2.weight.detach().abs().sum()) == 0.0  # residual branches start as identity


def test_resnet_errors():
    with pytest.raises(ValueError, match="blocks_per_stage"):
        build_resnet(_model_cfg(arch="resnet", widths=[8, 16], blocks_per_stage=[1]))
    with pytest.raises(ValueError, match="not a CNN"):
        build_resnet(_model_cfg(arch="gpt2"))


def _rnn_params(arch, vocab, h, layers, directions):
    gates = 4 if arch == "lstm" else 3
    n = 0
    for layer in range(layers):
        inp = h if layer == 0 else h * directions
        n += directions * gates * (h * inp + h * h + 2 * h)
    return vocab * h + n


@pytest.mark.parametrize("arch", ["lstm", "gru"])
@pytest.mark.parametrize("tied", [True, False])
def test_rnn_lm(arch, tied):
    cfg = _model_cfg(arch=arch, hidden_size=32, num_layers=2, tie_embeddings=tied, dropout=0.1)
    model = build_rnn_lm(cfg, 50, seed=0)
    ids = torch.randint(0, 50, (3, 7))
    assert model(ids).shape == (3, 7, 50)
    expected = _rnn_params(arch, 50, 32, 2, 1) + (0 if tied else 50 * 32)
    assert model.num_params() == expected
    assert (model.lm_head.weight is model.embed.weight) == tied


def test_rnn_lm_is_causal():
    model = build_rnn_lm(_model_cfg(arch="lstm", hidden_size=16, num_layers=1), 20, seed=0).eval()
    ids = torch.randint(0, 20, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 20
    torch.testing.assert_close(model(ids)[:, :6], model(changed)[:, :6])  # the future never leaks back


@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_classifier(bidirectional):
    cfg = _model_cfg(arch="lstm", hidden_size=16, num_layers=2, bidirectional=bidirectional, num_classes=4)
    model = build_rnn_classifier(cfg, 30, seed=0).eval()
    d = 2 if bidirectional else 1
    assert model.num_params() == _rnn_params("lstm", 30, 16, 2, d) + 16 * d * 4 + 4
    ids = torch.randint(0, 30, (3, 9))
    assert model(ids).shape == (3, 4)
    # packed right-padded rows score like the unpadded sequences on their own
    lengths = torch.tensor([9, 5, 2])
    padded = model(ids, lengths)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(padded[i], model(ids[i:i + 1, :n])[0], atol=1e-5, rtol=1e-5)


def test_rnn_errors():
    with pytest.raises(ValueError, match="bidirectional"):
        build_rnn_lm(_model_cfg(arch="gru", bidirectional=True), 10)
    with pytest.raises(ValueError, match="vocab_size"):
        build_rnn_lm(_model_cfg(arch="lstm"), 0)
    with pytest.raises(ValueError, match="not an RNN"):
        build_rnn_classifier(_model_cfg(arch="resnet"), 10)
