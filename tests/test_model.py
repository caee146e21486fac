"""LSNet and artist models: checkpoint compatibility, any input size, fusion, heads, checkpoint loading."""

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch
from timm.utils import reparameterize_model

import model  # noqa: F401  (registers the models)
from artifacts.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint_atomic
from artifacts.model_source import find_checkpoint
from model.lsnet import Attention, relative_offset_index
from utils import UserError

REFERENCE_DIR = Path(__file__).parent / "reference"

# (registered name, create kwargs, reference file)
REFERENCE_MODELS = [
    ("lsnet_t", {}, "lsnet_t"),
    ("lsnet_s", {}, "lsnet_s"),
    ("lsnet_b", {}, "lsnet_b"),
    ("lsnet_t_distill", {}, "lsnet_t_distill"),
    ("lsnet_s_distill", {}, "lsnet_s_distill"),
    ("lsnet_b_distill", {}, "lsnet_b_distill"),
    ("lsnet_t_artist", {"num_classes": 10, "feature_dim": 256}, "lsnet_t_artist_fd256_c10"),
    ("lsnet_s_artist", {"num_classes": 10, "feature_dim": 256}, "lsnet_s_artist_fd256_c10"),
    ("lsnet_b_artist", {"num_classes": 10, "feature_dim": 256}, "lsnet_b_artist_fd256_c10"),
    ("lsnet_t_artist", {"num_classes": 10}, "lsnet_t_artist_nofd_c10"),
]


def randomize_batchnorm(net: torch.nn.Module, seed: int = 0) -> None:
    """Give every norm layer non-trivial statistics and affine parameters, so fusion is really tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@pytest.mark.parametrize(("name", "kwargs", "reference"), REFERENCE_MODELS)
def test_state_dict_matches_reference(name, kwargs, reference):
    ref = json.loads((REFERENCE_DIR / f"{reference}.json").read_text())
    net = timm.create_model(name, **kwargs)
    state = net.state_dict()
    assert list(state) == list(ref["state_dict"]), "key names or order differ from the reference"
    for key, shape in ref["state_dict"].items():
        assert list(state[key].shape) == shape, key
    assert sum(p.numel() for p in net.parameters()) == ref["num_parameters"]


@pytest.mark.parametrize(("name", "millions"), [("lsnet_t", 11.4), ("lsnet_s", 16.1), ("lsnet_b", 23.3)])
def test_parameter_counts_match_paper(name, millions):
    net = timm.create_model(name)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == millions


@pytest.mark.parametrize("name", ["lsnet_l_artist", "lsnet_xl_artist", "lsnet_xl_artist_448"])
def test_large_artist_variants_build(name):
    net = timm.create_model(name, num_classes=7, feature_dim=128).eval()
    embed = {"lsnet_l_artist": 640}.get(name, 768)
    assert net.num_features == embed and net.head_hidden_size == 128 and net.num_classes == 7
    assert not hasattr(net, "feature_dim")  # timm reads model.feature_dim as the channel axis
    expected_size = 448 if name.endswith("448") else 224
    assert net.pretrained_cfg["input_size"] == (3, expected_size, expected_size)
    with torch.no_grad():
        features, logits = net(torch.randn(1, 3, 64, 64), return_both=True)
    assert features.shape == (1, 128) and logits.shape == (1, 7)


@pytest.mark.parametrize("size", [(224, 224), (448, 448), (320, 224), (96, 96), (100, 75)])
def test_forward_any_input_size(size):
    net = timm.create_model("lsnet_t_artist", num_classes=5, feature_dim=64).eval()
    with torch.no_grad():
        features, logits = net(torch.randn(2, 3, *size), return_both=True)
    assert features.shape == (2, 64) and logits.shape == (2, 5)
    assert torch.isfinite(logits).all()


def test_attention_bias_at_training_resolution_is_the_stored_table():
    torch.manual_seed(0)
    attn = Attention(dim=64, key_dim=16, num_heads=4, attn_ratio=1, resolution=4)
    torch.nn.init.normal_(attn.attention_biases)
    # The generic (resizable) index reproduces the official index buffer exactly at the stored size ...
    assert torch.equal(relative_offset_index(4, 4), attn.attention_bias_idxs)
    assert torch.equal(attn.attention_bias(4, 4), attn.attention_biases[:, attn.attention_bias_idxs])
    # ... other grids get a bias that depends only on |dy|, |dx|, symmetric in the two positions ...
    bias = attn.attention_bias(7, 5)
    assert bias.shape == (4, 35, 35)
    assert torch.allclose(bias, bias.transpose(1, 2))
    assert torch.equal(bias[:, 0, 8], bias[:, 8, 0]) and not torch.allclose(bias[:, 0, 1], bias[:, 0, 5])
    # ... and resizing keeps what does not depend on the offset: a constant table stays that constant.
    with torch.no_grad():
        attn.attention_biases.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0])[:, None].expand(4, 16))
    expected = attn.attention_biases[:, :1, None].expand(4, 35, 35)
    assert torch.allclose(attn.attention_bias(7, 5), expected, atol=1e-6)
    assert torch.allclose(attn.attention_bias(2, 3), attn.attention_biases[:, :1, None].expand(4, 6, 6), atol=1e-6)


def test_output_at_224_uses_official_bias_indexing():
    torch.manual_seed(0)
    net = timm.create_model("lsnet_t", num_classes=10).eval()
    randomize_batchnorm(net)
    for m in net.modules():
        if isinstance(m, Attention):
            torch.nn.init.normal_(m.attention_biases)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = net(x)
        # Recompute the way the official code does: attention_biases[:, attention_bias_idxs].
        attn_layers = [m for m in net.modules() if isinstance(m, Attention)]
        originals = [m.attention_bias for m in attn_layers]
        for m in attn_layers:
            m.attention_bias = lambda h, w, m=m: m.attention_biases[:, m.attention_bias_idxs]
        expected = net(x)
        for m, orig in zip(attn_layers, originals, strict=True):
            m.attention_bias = orig
    assert torch.equal(out, expected)


def test_training_after_inference_at_another_size():
    """The bias index cached during inference-mode evaluation must not break a later training step."""
    relative_offset_index.cache_clear()
    net = timm.create_model("lsnet_t_artist", num_classes=3, feature_dim=16)
    with torch.inference_mode():
        net.eval()(torch.randn(1, 3, 96, 96))
    net.train()(torch.randn(2, 3, 96, 96)).sum().backward()
    assert net.blocks4[3].mixer.m.attention_biases.grad is not None


@pytest.mark.parametrize("name", ["lsnet_t_artist", "lsnet_t_distill"])
def test_fused_matches_unfused(name):
    torch.manual_seed(0)
    kwargs = {"num_classes": 6, "feature_dim": 96} if "artist" in name else {"num_classes": 6}
    net = timm.create_model(name, **kwargs).eval()
    randomize_batchnorm(net)
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        reference = net(x)
        fused = reparameterize_model(net, inplace=True)
        out = fused(x)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in fused.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules()) > 0  # the BN after SKA stays
    assert torch.allclose(out, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_distillation_heads_train_and_eval():
    net = timm.create_model("lsnet_t_artist", num_classes=4, distillation=True)
    x = torch.randn(2, 3, 64, 64)
    net.train()
    out, out_dist = net(x)
    assert out.shape == out_dist.shape == (2, 4)
    net.eval()
    with torch.no_grad():
        features = net.forward_head(net.forward_features(x), pre_logits=True)
        expected = (net.head(features) + net.head_dist(features)) / 2
        assert torch.allclose(net(x), expected)


def test_timm_head_api():
    net = timm.create_model("lsnet_t_artist", num_classes=3, feature_dim=32).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feature_map = net.forward_features(x)
        assert feature_map.shape == (2, 384, 1, 1)
        features = net.forward_head(feature_map, pre_logits=True)
        assert features.shape == (2, 32)
        logits = net(x)
        assert torch.allclose(logits, net.forward_head(feature_map))
        # The original fork's flags keep working in eager Python.
        assert torch.equal(features, net(x, return_features=True))
        both = net(x, return_both=True)
        assert torch.equal(both[0], features) and torch.equal(both[1], logits)
        assert net.get_classifier() is net.head
        net.reset_classifier(9)
        assert net(x).shape == (2, 9) and net.num_classes == 9
    assert net.num_features == 384 and net.head_hidden_size == 32


def test_texture_vector_is_the_channel_spread_of_the_first_three_stages():
    torch.manual_seed(0)  # random weights: over init seeds 0-5 the margin below is 0.03-0.20 (seed 0: 0.20)
    net = timm.create_model("lsnet_t_artist", num_classes=3, feature_dim=32).eval()
    randomize_batchnorm(net)
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        texture, logits = net(x, return_both=True, texture=True)
        assert texture.shape == (2, net.texture_dim) and net.texture_dim == 64 + 128 + 256
        assert torch.allclose(texture.norm(dim=1), torch.ones(2)) and torch.allclose(logits, net(x), atol=1e-5)
        assert torch.equal(net(x, return_features=True, texture=True), net.forward_texture(x))
        maps = net.forward_intermediates(x, [0, 1, 2], intermediates_only=True)
        spread = maps[1].flatten(2).std(2, correction=0)  # stage 2's part, by hand
        part = torch.nn.functional.normalize(spread - spread.mean(1, keepdim=True), dim=1) / 3**0.5
        assert torch.allclose(texture[:, 64:192], part, atol=1e-5)
        # A statistic over positions: the tiles of a striped image shuffled around keep its vector close, while an
        # image of another texture (a coarse checkerboard) is further away.
        rows, cols = torch.arange(96)[:, None], torch.arange(80)[None, :]
        stripes = (torch.sin(rows * 1.6) + 0.1 * cols / 80).expand(1, 3, 96, 80).clone()
        checks = (((rows // 24) + (cols // 24)) % 2 * 2.0 - 1).expand(1, 3, 96, 80).clone()
        tiles = stripes.unfold(2, 16, 16).unfold(3, 16, 16).reshape(1, 3, 30, 16, 16)
        order = torch.randperm(30, generator=torch.Generator().manual_seed(0))
        shuffled = tiles[:, :, order].view(1, 3, 6, 5, 16, 16).permute(0, 1, 2, 4, 3, 5).reshape(1, 3, 96, 80)
        vectors = net.forward_texture(torch.cat([stripes, shuffled, checks]))
        moved, other = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
        assert moved > 0.9 and moved > other + 0.1, (moved, other)
    fused = reparameterize_model(net, inplace=False)
    with torch.no_grad():
        assert torch.allclose(fused.forward_texture(x), texture, atol=1e-4)


def test_no_projection_with_other_feature_dim_is_an_error():
    with pytest.raises(ValueError, match="needs the projection"):
        timm.create_model("lsnet_t_artist", num_classes=3, feature_dim=32, use_projection=False)


def test_cpu_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    net = timm.create_model("lsnet_t_artist", num_classes=3, feature_dim=32)
    loss = torch.nn.functional.cross_entropy(net(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    lkp = [p for n, p in net.named_parameters() if ".lkp." in n]
    assert lkp and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lkp)
    assert any(p.grad.abs().sum() > 0 for p in lkp)


# ------------------------------------------------------------------------------------------- checkpoint loading


def small_artist(num_classes=4, feature_dim=48):
    return timm.create_model("lsnet_t_artist", num_classes=num_classes, feature_dim=feature_dim).eval()


def test_load_original_script_checkpoint_with_module_prefix_and_namespace(tmp_path):
    torch.manual_seed(0)
    source = small_artist()
    randomize_batchnorm(source)
    path = tmp_path / "checkpoint.pth"
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model": state, "epoch": 3, "args": argparse.Namespace(model="lsnet_t_artist", lr=1e-3)}, path)

    target = small_artist()
    ckpt = load_checkpoint(path, target)
    assert ckpt.args["model"] == "lsnet_t_artist" and ckpt.extra["epoch"] == 3
    assert ckpt.num_classes == 4 and ckpt.feature_dim == 48
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_compiled_prefix_and_bare_state_dict(tmp_path):
    source = small_artist()
    path = tmp_path / "bare.pth"
    torch.save({f"_orig_mod.{k}": v for k, v in source.state_dict().items()}, path)
    ckpt = read_checkpoint(path)
    assert set(ckpt.state_dict) == set(source.state_dict())


def test_head_reset_on_class_mismatch(tmp_path):
    source = small_artist(num_classes=4)
    path = tmp_path / "c4.pth"
    torch.save({"model": source.state_dict()}, path)
    target = small_artist(num_classes=7)
    fresh_head = target.head.l.weight.clone()
    messages = []
    load_checkpoint(path, target, reset_heads_on_mismatch=True, log=messages.append)
    assert torch.equal(target.head.l.weight, fresh_head)
    assert torch.equal(target.projection[0].l.weight, source.projection[0].l.weight)
    assert messages and "re-initialised" in messages[0]
    with pytest.raises(UserError, match="shape mismatches"):
        load_checkpoint(path, small_artist(num_classes=7))


def test_backbone_only_from_official_checkpoint(tmp_path):
    official = timm.create_model("lsnet_t_distill")
    path = tmp_path / "lsnet_t_distill.pth"
    torch.save({"model": official.state_dict()}, path)
    target = small_artist(num_classes=5, feature_dim=128)
    load_checkpoint(path, target, backbone_only=True)
    assert torch.equal(target.blocks3[3].mixer.lkp.cv4.weight, official.blocks3[3].mixer.lkp.cv4.weight)


def test_wrong_architecture_names_the_right_one(tmp_path):
    path = tmp_path / "s.pth"
    torch.save({"model": timm.create_model("lsnet_s_artist", num_classes=4, feature_dim=48).state_dict()}, path)
    with pytest.raises(UserError, match="lsnet_s_artist"):
        load_checkpoint(path, small_artist())


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Exploit(str(marker))}, fh)
    with pytest.raises(UserError, match="not loaded"):
        read_checkpoint(path)
    assert not marker.exists()
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Exploit(str(marker))}, tmp_path / "evil2.pth")
    with pytest.raises(UserError):
        read_checkpoint(tmp_path / "evil2.pth")
    assert not marker.exists()


def test_not_a_checkpoint_and_missing_file(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(UserError, match=r"notes.pth is not a checkpoint \(not a PyTorch .pth file\)"):
        read_checkpoint(text)
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 a zip cut short")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.pth")
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")


def test_atomic_save_gives_normal_file_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint_atomic({"model": {"w": torch.ones(2)}}, tmp_path / "model_best.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "model_best.pth").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["model_best.pth"]
    assert torch.equal(read_checkpoint(tmp_path / "model_best.pth").state_dict["w"], torch.ones(2))


def test_find_checkpoint_in_model_folders(tmp_path):
    (tmp_path / "checkpoint.pth").write_bytes(b"x")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.pth"
    (tmp_path / "best_checkpoint.pth").write_bytes(b"x")  # the published folders' name wins over the latest state
    assert find_checkpoint(tmp_path) == tmp_path / "best_checkpoint.pth"
    assert find_checkpoint(tmp_path, ["checkpoint.pth"]) == tmp_path / "checkpoint.pth"
    assert find_checkpoint(tmp_path / "checkpoint.pth") == tmp_path / "checkpoint.pth"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="folder without a checkpoint; expected one of model_best.pth"):
        find_checkpoint(empty)
    with pytest.raises(UserError, match="checkpoint not found"):
        find_checkpoint(tmp_path / "nothing.pth")
