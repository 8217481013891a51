"""Channel pruning of ResNets and hidden-unit pruning of LSTM/GRU models: exact surgery, importance against
hand computation, FLOPs, save/reload, sizes and bad inputs."""
import pytest
import torch

from megatrain.compress.channels import remove_units
from megatrain.weights.sources import build_plain, load_model, save_model
from megatrain.compress.measure_task import forward_macs
from megatrain.compress.prune_channels import (ChannelScores, channel_scores, groups_of, prune_channels,
                                               step_channel_sizes, target_channel_sizes)
from megatrain.config import ConfigError, build_config
from megatrain.config.schema import ModelConfig, PruneConfig
from megatrain.models.cnn import build_resnet
from megatrain.models.rnn import build_rnn_classifier, build_rnn_lm

BASIC = dict(arch="resnet", task="classification", widths=[8, 16], blocks_per_stage=[2, 1], block="basic")
BOTTLENECK = dict(BASIC, widths=[4, 8], block="bottleneck")
RNN = dict(vocab_size=20, hidden_size=12, num_layers=2, num_classes=5)


def _randomize(model, seed=0):
    """Every parameter and BN statistic random (the default init zeroes the last BN of each block, which would
    make the blocks identities and the test blind)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=g) * 0.5
                t.copy_(r.abs() + 0.5 if name.endswith("running_var") else r)
    return model


def _resnet(fields, seed=0):
    cfg = ModelConfig(**fields)
    return _randomize(build_resnet(cfg, seed=0), seed).eval(), cfg


def _rnn(arch, task, bidirectional=False, seed=0, **extra):
    cfg = ModelConfig(arch=arch, task=task, bidirectional=bidirectional, tie_embeddings=False, **RNN, **extra)
    build = build_rnn_lm if task == "language_modeling" else build_rnn_classifier
    return _randomize(build(cfg, cfg.vocab_size, seed=0), seed).eval(), cfg


def _ids(seed=0):
    return torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(seed))


def _scores_removing(groups, dead: dict[str, list[int]]) -> ChannelScores:
    """Scores that make prune_channels remove exactly ``dead[group]`` (lowest score) from every group."""
    units = {}
    for g in groups:
        s = torch.ones(g.size, dtype=torch.float64)
        s[dead[g.key]] = 0
        units[g.key] = s
    return ChannelScores(units, "l1")


@pytest.mark.parametrize("fields", [BASIC, BOTTLENECK], ids=["basic", "bottleneck"])
def test_removing_zero_channels_is_exact(fields):
    model, cfg = _resnet(fields)
    groups = groups_of(model, cfg)
    dead = {g.key: [1, g.size - 2] for g in groups}
    mods = dict(model.named_modules())
    with torch.no_grad():  # a zero BN scale and shift make the channel exactly 0 after BN and ReLU (eval mode)
        for g in groups:
            bn = mods[g.slices[1].name.rsplit(".", 1)[0]]
            bn.weight[dead[g.key]] = 0
            bn.bias[dead[g.key]] = 0
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    new = tuple(w - 2 for w in cfg.stage_inner_widths)
    pruned, pcfg = prune_channels(model, cfg, _scores_removing(groups, dead), new)
    assert pcfg.inner_widths == list(new) and pcfg.widths == cfg.widths
    assert pruned.stages[0][0].conv1.weight.shape[0] == new[0]
    assert pruned.stages[1][0].bn1.running_var.shape == (new[1],)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    pruned.eval()
    # Not bit for bit: a convolution's reduction over input channels is blocked (oneDNN in fp32, im2col GEMM in
    # fp64), so fewer channels change the summation order of the kept terms; the removed terms are exact zeros.
    # Rounding-level tolerances (fp64: 1e-12 relative) still catch a mis-mapped channel, which is off by O(1).
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pruned.double()(x.double()), model.double()(x.double()), rtol=1e-12, atol=1e-12)


def _kill_units(model, dead: dict[str, list[int]]):
    """Make hidden units output exactly 0 at every step: zero the rows of their candidate gate (LSTM g, GRU n;
    weights and biases), so LSTM c stays 0 and h = o·tanh(0) = 0; GRU n = tanh(0 + r·0) = 0 and h = z·h_prev = 0."""
    rnn = model.rnn
    h, gate = rnn.hidden_size, 2  # LSTM [i, f, g, o] and GRU [r, z, n]: the candidate is gate 2 in both
    with torch.no_grad():
        for key, units in dead.items():
            sfx = key.split(".", 1)[1]
            rows = [gate * h + j for j in units]
            for t in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(rnn, f"{t}_{sfx}")[rows] = 0


@pytest.mark.parametrize("arch,task,bidir", [("lstm", "language_modeling", False), ("gru", "language_modeling", False),
                                              ("lstm", "classification", True), ("gru", "classification", True)],
                         ids=["lstm-lm", "gru-lm", "lstm-bidir-cls", "gru-bidir-cls"])
def test_removing_dead_hidden_units_is_exact(arch, task, bidir):
    model, cfg = _rnn(arch, task, bidir)
    groups = groups_of(model, cfg)
    assert len(groups) == cfg.num_layers * (2 if bidir else 1)
    dead = {g.key: [i, (i * 5 + 3) % g.size] for i, g in enumerate(groups)}  # other units per layer/direction
    _kill_units(model, dead)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
        if task == "classification":  # padded rows go through packing
            ref_packed = model(ids, torch.tensor([7, 4, 2]))
    pruned, pcfg = prune_channels(model, cfg, _scores_removing(groups, dead), (cfg.rnn_width - 2,))
    assert pcfg.rnn_hidden_size == 10 and pcfg.hidden_size == cfg.hidden_size
    assert pruned.embed.weight.shape == model.embed.weight.shape  # the embedding keeps its width
    pruned.eval()
    with torch.no_grad():
        # The recurrent matmuls reduce over H, so fewer units can change the summation order of the kept terms
        # (the removed terms are exact zeros); rounding-level tolerances still catch any mis-mapped unit.
        torch.testing.assert_close(pruned(ids), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(pruned.double()(ids), model.double()(ids), rtol=1e-12, atol=1e-12)
        if task == "classification":
            torch.testing.assert_close(pruned.float()(ids, torch.tensor([7, 4, 2])), ref_packed, rtol=1e-6, atol=1e-6)


def _owned_sum(tensors: dict, masks: dict, fn) -> torch.Tensor:
    return sum(fn(tensors[n].double())[m].sum() for n, m in masks.items())


def test_magnitude_matches_hand_computation_cnn():
    model, cfg = _resnet(BOTTLENECK)
    p = dict(model.named_parameters())
    l1, l2 = channel_scores("l1", model, cfg, []), channel_scores("l2", model, cfg, [])
    b = "stages.1.0"  # bottleneck conv2 channel 3: filter 3 of conv2, bn2[3], input channel 3 of conv3
    hand = (p[f"{b}.conv2.weight"][3].abs().sum() + p[f"{b}.bn2.weight"][3].abs() + p[f"{b}.bn2.bias"][3].abs()
            + p[f"{b}.conv3.weight"][:, 3].abs().sum())
    torch.testing.assert_close(l1.units[f"{b}.conv2"][3], hand.double())
    b = "stages.0.1"  # conv1 channel 0: filter 0 of conv1, bn1[0], input channel 0 of conv2
    hand = (p[f"{b}.conv1.weight"][0].square().sum() + p[f"{b}.bn1.weight"][0] ** 2 + p[f"{b}.bn1.bias"][0] ** 2
            + p[f"{b}.conv2.weight"][:, 0].square().sum()).sqrt()
    torch.testing.assert_close(l2.final(l2.units[f"{b}.conv1"][0]), hand.double())


def test_magnitude_matches_hand_computation_rnn():
    model, cfg = _rnn("lstm", "classification", bidirectional=True)
    h, t = cfg.rnn_width, dict(model.named_parameters())
    j = 2  # layer 0, backward direction, unit 2: element masks of everything it owns, each element once
    rows = [g * h + j for g in range(4)]
    masks = {}
    for n in ("weight_ih_l0_reverse", "weight_hh_l0_reverse", "bias_ih_l0_reverse", "bias_hh_l0_reverse"):
        m = torch.zeros_like(t[f"rnn.{n}"], dtype=torch.bool)
        m[rows] = True
        masks[f"rnn.{n}"] = m
    masks["rnn.weight_hh_l0_reverse"][:, j] = True  # its recurrent column (meets its rows at 4 elements)
    for n in ("weight_ih_l1", "weight_ih_l1_reverse"):  # the next layer reads [h_fwd, h_bwd]: column H + j
        m = torch.zeros_like(t[f"rnn.{n}"], dtype=torch.bool)
        m[:, h + j] = True
        masks[f"rnn.{n}"] = m
    l1 = channel_scores("l1", model, cfg, [])
    torch.testing.assert_close(l1.units["rnn.l0_reverse"][j], _owned_sum(t, masks, torch.abs))
    # top layer, forward unit 5: its rows, its column of weight_hh_l1, fc column 5 (not H + 5)
    rows = [g * h + 5 for g in range(4)]
    hand = sum(t[f"rnn.{n}_l1"][rows].double().square().sum() for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    col = t["rnn.weight_hh_l1"][:, 5].double().square()
    hand = hand + col.sum() - col[rows].sum() + t["fc.weight"][:, 5].double().square().sum()
    l2 = channel_scores("l2", model, cfg, [])
    torch.testing.assert_close(l2.units["rnn.l1"][5], hand)


def test_taylor_and_activation_match_hand_computation_cnn():
    model, cfg = _resnet(BASIC)
    g = torch.Generator().manual_seed(3)
    batches = [{"x": torch.randn(4, 1, 8, 8, generator=g), "y": torch.randint(0, 10, (4,), generator=g)}
               for _ in range(2)]

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b["x"]), b["y"])
    tay = channel_scores("taylor", model, cfg, batches, loss_fn)
    blk = model.stages[1][0]
    hand = torch.zeros((), dtype=torch.float64)
    for b in batches:  # Σ_batches |w·g| over conv1 filter 5, bn1[5], conv2 input channel 5
        model.zero_grad()
        loss_fn(model, b).backward()
        for w, idx in ((blk.conv1.weight, (5,)), (blk.bn1.weight, (5,)), (blk.bn1.bias, (5,)),
                       (blk.conv2.weight, (slice(None), 5))):
            hand += (w[idx] * w.grad[idx]).double().abs().sum()
    torch.testing.assert_close(tay.units["stages.1.0.conv1"][5], hand)

    act = channel_scores("activation", model, cfg, batches[:1], loss_fn)
    with torch.no_grad():  # mean |ReLU(BN(conv1(x)))| of channel 5 over samples and pixels (the input of conv2)
        x = model.stages[0](model.stem(batches[0]["x"]))
        inner = blk.act(blk.bn1(blk.conv1(x)))  # (B, C, H, W)
    torch.testing.assert_close(act.units["stages.1.0.conv1"][5], inner[:, 5].abs().mean().double())


def test_flops_count_matches_hand_computation():
    cfg = ModelConfig(arch="resnet", task="classification")  # widths 16/32/64 on 8×8 digits
    model = build_resnet(cfg, seed=0).eval()
    # stem 1→16 at 8×8; stage 0: two 16→16 3×3 at 8×8; stage 1: 16→32 s2 and 32→32 at 4×4 + 1×1 shortcut;
    # stage 2: 32→64 s2 and 64→64 at 2×2 + shortcut; fc 64→10
    hand = (16 * 9 * 64 + 2 * 16 * 16 * 9 * 64 + (32 * 16 * 9 + 32 * 32 * 9 + 32 * 16) * 16
            + (64 * 32 * 9 + 64 * 64 * 9 + 64 * 32) * 4 + 64 * 10)
    assert forward_macs(model, lambda: model(torch.zeros(1, 1, 8, 8))) == hand
    model, cfg = _rnn("gru", "language_modeling", rnn_hidden_size=10)
    e, h, v = cfg.hidden_size, 10, cfg.vocab_size  # per token: 3 gates·H·(in + H) per layer, head H·V
    per_token = 3 * h * (e + h) + 3 * h * (h + h) + h * v
    assert forward_macs(model, lambda: model(_ids())) == 21 * per_token


def test_pruned_models_save_and_reload(tmp_path):
    for i, (model, cfg) in enumerate([_resnet(BOTTLENECK), _rnn("gru", "classification", True),
                                      _rnn("lstm", "language_modeling")]):
        scores = channel_scores("l2", model, cfg, [])
        new = tuple(w // 2 for w in (cfg.stage_inner_widths if cfg.arch == "resnet" else [cfg.rnn_width]))
        pruned, pcfg = prune_channels(model, cfg, scores, new)
        save_model(str(tmp_path / str(i)), pruned, pcfg)
        again, again_cfg = load_model(str(tmp_path / str(i)))
        assert again_cfg == pcfg
        pruned.eval(), again.eval()
        x = torch.randn(2, 1, 8, 8) if cfg.arch == "resnet" else _ids(4)
        with torch.no_grad():
            assert torch.equal(again(x), pruned(x))
    cfg = ModelConfig(**BASIC)  # the stem is not in the config: it is read back from the weights
    big = build_resnet(cfg, seed=0, stem="imagenet")
    assert build_plain(cfg, big.state_dict()).stem[0].kernel_size == (7, 7)


def test_sizes_and_iterative_steps():
    cfg = ModelConfig(**dict(BASIC, widths=[16, 32, 64], blocks_per_stage=[1, 1, 1]))
    assert target_channel_sizes(cfg, PruneConfig(channels=0.5)) == (8, 16, 32)
    steps = [step_channel_sizes((16, 32, 64), (8, 16, 32), i, 3) for i in (1, 2, 3)]
    assert steps == [(13, 27, 53), (11, 21, 43), (8, 16, 32)]
    rnn = ModelConfig(arch="lstm", hidden_size=64, tie_embeddings=False)
    assert target_channel_sizes(rnn, PruneConfig(channels=0.25)) == (48,)
    state = {"w": torch.arange(12.0).view(3, 4)}  # surgery alone: rows 1 and 2·... of a 2-gate group of 2
    from megatrain.compress.channels import Group, Slice
    g = Group("x", 2, (Slice("w", 0, gates=1, offset=1), Slice("w", 1, gates=2)))
    out = remove_units(state, [g], {"x": torch.tensor([0])})
    assert torch.equal(out["w"], torch.tensor([[1.0, 3.0], [9.0, 11.0]]))  # row 1, columns 0 and 2 gone


def test_bad_inputs_are_one_line_errors():
    cnn = ModelConfig(**BASIC)
    cases = [
        (cnn, PruneConfig(channels=0.5), 2, r"model.arch=resnet is not tensor-parallel.*parallel.tp=1"),
        (cnn, PruneConfig(mlp=0.5, channels=0.5), 1, r"prune.mlp is for gpt2/llama.*use prune.channels"),
        (cnn, PruneConfig(), 1, r"prune.channels=0 removes nothing"),
        (cnn, PruneConfig(channels=0.01), 1, r"prune.channels=0.01 removes no inner channel .* use at least"),
        (cnn, PruneConfig(channels=0.97), 1, r"prune.channels=0.97 removes all 8 .* use a fraction below"),
        (ModelConfig(arch="lstm", tie_embeddings=True), PruneConfig(channels=0.5), 1,
         r"model.tie_embeddings=true: the LM head shares the embedding.*tie_embeddings=false"),
    ]
    for m, p, tp, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            target_channel_sizes(m, p, tp=tp)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"prune.channels=1.0 would remove every unit"):
        build_config({"prune": {"channels": 1.0}})
    with pytest.raises(ConfigError, match=r"model.rnn_hidden_size=8 differs .* tie_embeddings: false"):
        build_config({"model": {"arch": "lstm", "tie_embeddings": True, "rnn_hidden_size": 8}})
    with pytest.raises(ConfigError, match=r"model.inner_widths=\[4\] needs one positive width per stage"):
        build_config({"model": dict(BASIC, inner_widths=[4])})
    from megatrain.compress.prune import target_sizes
    with pytest.raises(ValueError, match=r"prune.channels is for resnet/lstm/gru; .* use prune.mlp"):
        target_sizes(ModelConfig(arch="gpt2"), PruneConfig(channels=0.5))


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_rnn_activation_is_mean_abs_output_of_each_layer(arch):
    """Hand computation with torch's own per-layer outputs: a 1-layer model's output is layer 0's h_t; a
    2-layer bidirectional classifier's top-layer h_t comes back from nn.LSTM/GRU as its output too."""
    model, cfg = _rnn(arch, "classification", bidirectional=True)
    ids, lengths = _ids(), torch.tensor([7, 4, 6])

    def loss_fn(m, b):
        return m(b["ids"], b["lengths"]).sum()
    act = channel_scores("activation", model, cfg, [{"ids": ids, "lengths": lengths}], loss_fn)
    with torch.no_grad():
        x = torch.nn.utils.rnn.pack_padded_sequence(model.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        top = model.rnn(x)[0].data  # (real tokens, 2·H): the top layer's h_t, both directions
        one = type(model.rnn)(12, 12, num_layers=1, batch_first=True, bidirectional=True)
        for n in one._flat_weights_names:  # the bottom layer alone
            getattr(one, n).copy_(getattr(model.rnn, n))
        bottom = one(x)[0].data
    assert top.shape[0] == 17  # only real tokens count, not padding
    for layer, out in ((0, bottom), (1, top)):
        torch.testing.assert_close(act.units[f"rnn.l{layer}"], out[:, :12].abs().mean(0).double())
        torch.testing.assert_close(act.units[f"rnn.l{layer}_reverse"], out[:, 12:].abs().mean(0).double())
