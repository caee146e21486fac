"""timm conformance of every registered ``lsnet*`` model, following what timm's own ``tests/test_models.py`` checks.

Written for this project (not a copy of timm's file): forward, backward, default_cfgs, default_cfgs_non_std,
``features_only`` (the intermediates getter and the FX extractor), ``forward_intermediates`` and pruning,
TorchScript, and FX (forward, backward, TorchScript of the traced graph). Every name runs with its own widths, heads,
image size, head type and empty-or-not first stage, but with few blocks (``SHALLOW``: every block type -- RepVGG+SE,
LS convolution, attention -- and every downsampling stays) and on 96x64 inputs, so the module stays cheap on a 2-core
CPU; tests/test_model.py covers the full-depth models. ``make test`` runs one name per kind (``QUICK``: the empty first
stage of lsnet_t, a distilled model, an artist model with its own input size); ``LSNET_CONFORMANCE_ALL=1`` runs every
registered name (about 5 CPU-minutes). Also here: the official pretrained
weights through a pre-filled, offline Hugging Face cache and a local file, and ``fuse()``.
"""

import copy
import math
import os

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import model  # noqa: F401  (registers the models)
from model import GF_MODELS, create_glance_focus, load_pretrained_backbone
from model.lsnet import MODEL_ARGS, BN_Linear
from model.lsnet_artist import ARTIST_MODEL_ARGS
from utils import UserError

REGISTERED = timm.list_models("lsnet*")  # image classifiers and backbones only (see test_registry_holds_timm_models)
QUICK = ["lsnet_t", "lsnet_s_distill", "lsnet_xl_artist_448"]
NAMES = REGISTERED if os.environ.get("LSNET_CONFORMANCE_ALL") == "1" else QUICK
ARCH_ARGS = {**MODEL_ARGS, **{f"{n}_distill": a for n, a in MODEL_ARGS.items()}, **ARTIST_MODEL_ARGS}
SHALLOW = {name: (min(ARCH_ARGS[name]["depth"][0], 1), 2, 0, 2) for name in REGISTERED}
BATCH, HEIGHT, WIDTH = 2, 96, 64
MAP_SIZE = (math.ceil(HEIGHT / 64), math.ceil(WIDTH / 64))  # the last map: stride 64, rounded up


_BUILT: dict[tuple, torch.nn.Module] = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread wastes less CPU than two spinning on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_selection_covers_every_kind():
    assert set(QUICK) <= set(REGISTERED) and len(REGISTERED) == 12
    kinds = {("distill" in n, "artist" in n) for n in REGISTERED}
    assert kinds == {("distill" in n, "artist" in n) for n in QUICK}


def test_registry_holds_timm_models():
    """Every registered name is a timm image model with a pretrained_cfg; the glance-and-focus models (an image pair
    in) stay out of timm's registry and are created by the project's own code."""
    assert not set(GF_MODELS) & set(timm.list_models()) and all(not timm.is_model(name) for name in GF_MODELS)
    assert all(timm.get_pretrained_cfg(name) is not None for name in REGISTERED)
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("lsnet_t_gf")
    net = create_glance_focus("lsnet_t_gf", num_classes=3, glance_size=32, patch_size=32, focus_steps=1)
    glance, focus = torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        assert net.eval()(glance, focus, policy="fallback").logits.shape == (2, 1, 3)


def create(name: str, **kwargs) -> torch.nn.Module:
    """A fresh copy of the shallow ``name`` (built once per arguments, from a fixed seed)."""
    key = (name, *sorted(kwargs.items()))
    if key not in _BUILT:
        torch.manual_seed(0)
        _BUILT[key] = timm.create_model(name, depth=SHALLOW[name], **kwargs)
    return copy.deepcopy(_BUILT[key])


def run_scripted(scripted, x: torch.Tensor):
    """Run a scripted module once without TorchScript's (slow, first-call) graph optimisation."""
    with torch.jit.optimized_execution(False):
        return scripted(x)


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


def as_one(outputs) -> torch.Tensor:
    """A distilled model in training returns (head, head_dist): test both, like timm."""
    if isinstance(outputs, dict):
        outputs = tuple(outputs.values())
    return torch.cat(outputs) if isinstance(outputs, (tuple, list)) else outputs


def fx_model(net: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """The model traced by torchvision's FX feature extractor with timm's leaf modules/functions (as timm tests)."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(net, tracer_kwargs=tracer_kwargs)
    if train and hasattr(net, "head_dist"):  # the two heads' outputs, not their tuple
        train_return = [n for n in train_nodes if n in ("head.l", "head_dist.l")]
    else:
        train_return = [train_nodes[-1]]
    return create_feature_extractor(net, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


def assert_all_grads(net: torch.nn.Module) -> None:
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:3]}"


@pytest.mark.parametrize("name", NAMES)
def test_forward(name):
    net = create(name).eval()
    with torch.no_grad():
        out = net(inputs())
    assert out.shape == (BATCH, 1000) and not torch.isnan(out).any()


@pytest.mark.parametrize("name", NAMES)
def test_backward(name):
    net = create(name, num_classes=42).train()
    out = as_one(net(inputs()))
    out.mean().backward()
    assert out.shape[-1] == 42
    assert_all_grads(net)


@pytest.mark.parametrize("name", NAMES)
def test_default_cfgs(name):
    net = create(name).eval()
    cfg = net.pretrained_cfg
    assert net.num_classes > 0 and net.num_features > 0 and net.head_hidden_size > 0
    size = cfg["input_size"][-1]
    assert tuple(cfg["pool_size"]) == (math.ceil(size / 64),) * 2  # the map at the cfg's size (stride 64)
    x = inputs()
    with torch.no_grad():
        feature_map = net.forward_features(x)
        pre_logits = net.forward_head(feature_map, pre_logits=True)
        assert feature_map.shape == (BATCH, net.num_features, *MAP_SIZE)
        assert pre_logits.shape == (BATCH, net.head_hidden_size)
        net.reset_classifier(0)
        assert net.num_classes == 0
        pooled = net(x)
        assert pooled.shape == pre_logits.shape and torch.allclose(pooled, pre_logits)
        net.reset_classifier(0, "")
        assert torch.equal(net(x), feature_map)
        unpooled = create(name, num_classes=0, global_pool="").eval()(x)
    assert unpooled.shape == feature_map.shape
    state = net.state_dict()
    classifiers = cfg["classifier"] if isinstance(cfg["classifier"], tuple) else (cfg["classifier"],)
    assert all(f"{c}.weight" in create(name).state_dict() for c in classifiers)
    assert f"{cfg['first_conv']}.weight" in state


@pytest.mark.parametrize("name", NAMES)
def test_default_cfgs_non_std(name):
    net = create(name).eval()
    assert getattr(net, "feature_dim", None) is None  # timm would read it as the channel axis
    x = inputs()
    with torch.no_grad():
        feature_map = net.forward_features(x)
        pre_logits = net.forward_head(feature_map, pre_logits=True)
        assert feature_map.shape[1] == net.num_features and pre_logits.shape[1] == net.head_hidden_size
        net.reset_classifier(0)
        assert net(x).shape == pre_logits.shape
        assert create(name, num_classes=0).eval()(x).shape == (BATCH, net.num_features)


def test_artist_projection_contract():
    """With a projection the style vector (head_hidden_size) differs from the map's channels (num_features)."""
    net = create("lsnet_t_artist", num_classes=5, feature_dim=48).eval()
    assert (net.num_features, net.head_hidden_size) == (384, 48)
    x = inputs()
    with torch.no_grad():
        feature_map = net.forward_features(x)
        style = net.forward_head(feature_map, pre_logits=True)
        logits = net(x)
        assert feature_map.shape == (BATCH, 384, *MAP_SIZE) and style.shape == (BATCH, 48)
        assert torch.equal(net(x, return_features=True), style)  # the original fork's flags, eager only
        both = net(x, return_both=True)
        assert torch.equal(both[0], style) and torch.equal(both[1], logits)
        net.reset_classifier(0)
        assert torch.allclose(net(x), style)
        net.reset_classifier(0, "")
        assert torch.equal(net(x), feature_map)
    with pytest.raises(ValueError, match="needs num_classes=0"):
        net.reset_classifier(3, "")


@pytest.mark.parametrize("name", NAMES)
def test_features_only(name):
    """features_only=True (the forward_intermediates getter) and the FX extractor give the same four maps."""
    getter = create(name, features_only=True).eval()
    torch.manual_seed(0)  # the same weights as the getter's
    graph = timm.create_model(name, depth=SHALLOW[name], features_only=True, feature_cls="fx").eval()
    channels = list(ARCH_ARGS[name]["embed_dim"])
    assert getter.feature_info.channels() == graph.feature_info.channels() == channels
    assert getter.feature_info.reduction() == [8, 16, 32, 64]
    x = inputs()
    with torch.no_grad():
        maps, graph_maps = getter(x), graph(x)
    assert len(maps) == len(graph_maps) == 4
    for c, r, m, g in zip(channels, [8, 16, 32, 64], maps, graph_maps, strict=True):
        assert m.shape == (BATCH, c, math.ceil(HEIGHT / r), math.ceil(WIDTH / r))
        assert torch.equal(m, g) and not torch.isnan(m).any()


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates(name):
    net = create(name).eval()
    x = inputs()
    with torch.no_grad():
        final, intermediates = net.forward_intermediates(x)
        assert [t.shape[1] for t in intermediates] == [info["num_chs"] for info in net.feature_info]
        assert torch.allclose(final, net.forward_features(x))
        subset = net.forward_intermediates(x, indices=[0, 2], stop_early=True, intermediates_only=True)
        assert len(subset) == 2 and torch.equal(subset[1], intermediates[2])
        net.set_grad_checkpointing()
        checkpointed, _ = net.forward_intermediates(x)
        assert torch.allclose(checkpointed, final, rtol=1e-4, atol=1e-5)
        assert net.prune_intermediate_layers([1]) == [1]
        assert torch.equal(net(x), intermediates[1]) and net.num_features == net.feature_info[1]["num_chs"]


@pytest.mark.parametrize("name", NAMES)
def test_torchscript(name):
    with timm.layers.set_scriptable(True):
        net = timm.create_model(name, depth=SHALLOW[name]).eval()
    x = inputs()
    with torch.no_grad():
        expected = net(x)
        out = run_scripted(torch.jit.script(net), x)
    assert out.shape == (BATCH, 1000)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_fx_forward(name):
    net = create(name).eval()
    x = inputs()
    with torch.inference_mode():
        expected = net(x)
        out = as_one(fx_model(net)(x))
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", NAMES)
def test_fx_backward(name):
    net = create(name, num_classes=42).train()
    traced = fx_model(net, train=True)
    out = as_one(traced(inputs()))
    out.mean().backward()
    assert out.shape[-1] == 42
    assert_all_grads(traced)


@pytest.mark.parametrize("name", NAMES)
def test_fx_torchscript(name):
    with timm.layers.set_scriptable(True):
        net = timm.create_model(name, depth=SHALLOW[name]).eval()
    x = inputs()
    with torch.inference_mode():
        expected = net(x)
        out = as_one(run_scripted(torch.jit.script(fx_model(net)), x))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ classifier reset, fusion


def test_reset_classifier_keeps_eval_mode():
    net = create("lsnet_t_distill").eval()
    net.reset_classifier(10)
    assert not net.head.training and not net.head_dist.training
    x = inputs()
    stats = net.head.bn.running_mean.clone()
    with torch.no_grad():
        single = net(x[:1])  # a batch of one needs eval-mode BatchNorm
        assert torch.allclose(single, net(x)[:1], atol=1e-6)
    assert torch.equal(net.head.bn.running_mean, stats)


def test_fuse_in_place_equals_unfused():
    net = create("lsnet_t_artist", num_classes=4, feature_dim=32).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = inputs()
    with torch.no_grad():
        expected = net(x)
        fused = net.fuse()
        assert fused is net and not any(isinstance(m, (torch.nn.BatchNorm1d, BN_Linear)) for m in net.modules())
        torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-4)
        wrapped = torch.nn.Sequential(create("lsnet_t").eval())  # timm's walker calls the model's fuse()
        reference = wrapped(x)
        torch.testing.assert_close(timm.utils.reparameterize_model(wrapped)(x), reference, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ official pretrained weights



def official_checkpoint(name: str, seed: int) -> dict:
    """A randomly initialised state_dict in the official release's layout ({"model": state_dict})."""
    torch.manual_seed(seed)
    return {"model": timm.create_model(name).state_dict()}


def assert_backbone_equal(net: torch.nn.Module, state_dict: dict) -> None:
    own = net.state_dict()
    backbone = [k for k in own if not k.startswith(("head", "projection"))]
    assert backbone and all(torch.equal(own[k], state_dict[k]) for k in backbone)


def test_pretrained_from_offline_hub_cache(offline_hub):
    checkpoint = official_checkpoint("lsnet_t", seed=1)
    offline_hub("jameslahm/lsnet_t", checkpoint)
    net = timm.create_model("lsnet_t", pretrained=True)
    assert all(torch.equal(v, checkpoint["model"][k]) for k, v in net.state_dict().items())
    # An artist model takes the backbone only: its projection and heads start fresh.
    artist = timm.create_model("lsnet_t_artist", pretrained=True, num_classes=5, feature_dim=32)
    assert_backbone_equal(artist, checkpoint["model"])
    assert artist.head.l.weight.shape == (5, 32)
    features = timm.create_model("lsnet_t", pretrained=True, features_only=True)
    assert torch.equal(features.model.blocks4[-1].ffn.m.pw2.c.weight,
                       checkpoint["model"]["blocks4.11.ffn.m.pw2.c.weight"])


def test_load_pretrained_backbone_offline_and_from_file(offline_hub, tmp_path):
    net = timm.create_model("lsnet_t_artist", num_classes=3, feature_dim=16)
    head = net.head.l.weight.clone()
    with pytest.raises(UserError, match=r"huggingface-cli download jameslahm/lsnet_t") as err:
        load_pretrained_backbone(net)  # nothing cached, no network
    assert "\n" not in str(err.value)
    checkpoint = official_checkpoint("lsnet_t", seed=2)
    offline_hub("jameslahm/lsnet_t", checkpoint)
    load_pretrained_backbone(net)
    assert_backbone_equal(net, checkpoint["model"])
    assert torch.equal(net.head.l.weight, head)
    # A local copy: the official distilled file (with DDP prefixes), through the helper and timm's file override.
    distilled = official_checkpoint("lsnet_t_distill", seed=3)
    path = tmp_path / "lsnet_t_distill.pth"
    torch.save({"model": {f"module.{k}": v for k, v in distilled["model"].items()}}, path)
    load_pretrained_backbone(net, path)
    assert_backbone_equal(net, distilled["model"])
    plain = timm.create_model("lsnet_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert_backbone_equal(plain, distilled["model"])
    assert torch.equal(plain.head.l.weight, distilled["model"]["head.l.weight"])
    other = tmp_path / "lsnet_s.pth"
    torch.save(official_checkpoint("lsnet_s", seed=4), other)
    with pytest.raises(UserError, match="not an LSNet backbone of lsnet_t_artist"):
        load_pretrained_backbone(net, other)


def test_artist_pretrained_with_one_input_channel(offline_hub):
    """timm adapts the first convolution to in_chans after the pretrained filter: the artist models' backbone
    filter lets that convolution's channel count differ, as the plain models' filter does."""
    torch.manual_seed(5)
    checkpoint = timm.create_model("lsnet_t", depth=SHALLOW["lsnet_t"]).state_dict()  # stand-in official weights
    offline_hub("jameslahm/lsnet_t", {"model": checkpoint})
    net = timm.create_model("lsnet_t_artist", pretrained=True, in_chans=1, num_classes=5, depth=SHALLOW["lsnet_t"])
    first = "patch_embed.0.c.weight"
    assert torch.equal(net.state_dict()[first], checkpoint[first].sum(1, keepdim=True))  # timm's adapt_input_conv
    assert_backbone_equal(net, {**checkpoint, first: net.state_dict()[first]})
    assert net(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    fresh = timm.create_model("lsnet_t_artist", in_chans=1, num_classes=5, depth=SHALLOW["lsnet_t"])
    load_pretrained_backbone(fresh)  # the project's helper takes the same path
    assert torch.equal(fresh.state_dict()[first], net.state_dict()[first])
