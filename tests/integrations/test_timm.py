"""timm integration (mod_models.integrations.timm): registry, timm's keywords and model interface, features,
gradient checkpointing, and timm's own data / optimizer / loss / EMA utilities on generated data.

Expected widths, channels and reductions below are written out from the architectures, not read
back from mod_models.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import timm.data
import timm.loss
import timm.optim
import timm.utils
import torch
from single_thread import one_intra_op_thread  # noqa: F401  (fixture)
from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt
from torch import nn

import mod_models.integrations.timm  # noqa: F401  (registers the MoD variants with timm)
from mod_models import MOD_BUILDERS, MoDBlock
from mod_models.integrations.features import disable_inplace
from mod_models.train.data import SyntheticShapes, write_image_folder

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

REPO_ROOT = Path(__file__).resolve().parents[2]

# variant: num_features (the classifier's input width)
NUM_FEATURES = {
    "resnet18_mod": 512, "resnet26_mod": 512, "resnet34_mod": 512, "resnet42_mod": 512,
    "resnet50_mod": 2048, "resnet75_mod": 2048, "resnet86_mod": 2048, "resnet101_mod": 2048, "resnet152_mod": 2048,
    "mobilenet_v2_mod": 1280, "mobilenet_v2_mod_l": 1280,
}
# variant: number of MoD blocks (sum over the stages of blocks // 2)
MOD_BLOCK_COUNT = {
    "resnet18_mod": 4, "resnet26_mod": 5, "resnet34_mod": 7, "resnet42_mod": 8, "resnet50_mod": 7,
    "resnet75_mod": 11, "resnet86_mod": 13, "resnet101_mod": 15, "resnet152_mod": 24,
    "mobilenet_v2_mod": 6, "mobilenet_v2_mod_l": 6,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _mod_block_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, MoDBlock)]


# ----------------------------------------------------------------------------------------------
# Registry and keywords
# ----------------------------------------------------------------------------------------------


def test_every_variant_is_in_timms_registry():
    assert sorted(timm.list_models("*_mod*")) == sorted(NUM_FEATURES)
    assert all(timm.is_model(name) for name in NUM_FEATURES)


@pytest.mark.parametrize("name", ["resnet18_mod", "resnet50_mod", "mobilenet_v2_mod_l"])
def test_create_model_defaults_build_the_plain_builders_model(name):
    torch.manual_seed(0)
    plain = MOD_BUILDERS[name](num_classes=5).eval()
    torch.manual_seed(0)
    default = timm.create_model(name, num_classes=5).eval()
    # Same seed, default keywords: the plain builder's weights, module names and outputs.
    assert list(default.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), plain.state_dict().values()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(default(x), plain(x), rtol=0, atol=0)
    data = timm.data.resolve_data_config(model=default)  # what timm's train.py / validate.py use
    assert data == {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": IMAGENET_MEAN,
                    "std": IMAGENET_STD, "crop_pct": 0.875, "crop_mode": "center"}


@pytest.mark.parametrize("name", list(NUM_FEATURES))
def test_create_model_with_timms_keywords(name):
    model = timm.create_model(
        name, pretrained=False, in_chans=1, num_classes=7, global_pool="avgmax", drop_rate=0.25,
        drop_path_rate=0.0, drop_block_rate=None, bn_momentum=0.05, bn_eps=1e-3,
        checkpoint_path=None, scriptable=None, exportable=None, no_jit=None,
    )
    assert len(_mod_block_names(model)) == MOD_BLOCK_COUNT[name]
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert (model.num_classes, model.in_chans, model.num_features) == (7, 1, NUM_FEATURES[name])
    assert model.get_classifier().out_features == 7 and model.get_classifier().in_features == NUM_FEATURES[name]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all((m.momentum, m.eps) == (0.05, 1e-3) for m in norms)  # MoD blocks' norms too

    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 0.875
    assert tuple(cfg["mean"]) == IMAGENET_MEAN and tuple(cfg["std"]) == IMAGENET_STD and cfg["num_classes"] == 1000
    assert model.get_submodule(cfg["first_conv"]).in_channels == 1
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert model.get_classifier(name_only=True) == cfg["classifier"]


@pytest.mark.parametrize(
    "keywords, error, message",
    [
        ({"pretrained": True}, ValueError, "pretrained=True, but no pretrained weights exist"),
        ({"drop_path_rate": 0.1}, ValueError, r"drop_path_rate=0.1: MoD models have no stochastic depth"),
        ({"drop_block_rate": 0.1}, ValueError, "drop_block_rate=0.1: MoD models have no DropBlock"),
        ({"global_pool": "mean"}, ValueError, "global_pool must be one of"),
        ({"global_pool": ""}, ValueError, r"global_pool='' \(no pooling\) needs num_classes=0"),
        ({"in_chans": 0}, ValueError, "in_chans must be an int >= 1, got 0"),
        ({"num_classes": -1}, ValueError, "num_classes must be an int >= 0, got -1"),
        ({"drop_rate": 1.5}, ValueError, r"drop_rate must be a float in \[0, 1\), got 1.5"),
        ({"bn_momentum": 2.0}, ValueError, r"bn_momentum must be a float in \(0, 1\], got 2.0"),
        ({"bn_eps": 0.0}, ValueError, "bn_eps must be a float > 0"),
        ({"bn_eps": 1e-3, "norm_layer": nn.BatchNorm2d}, ValueError, "either norm_layer or bn_momentum/bn_eps"),
        ({"dtype": torch.int64}, ValueError, "dtype must be a floating torch.dtype"),
        ({"zero_init_last": True}, TypeError, "unexpected keyword argument 'zero_init_last'"),
        ({"capacity": 0}, ValueError, "capacity must be >= 1"),
    ],
)
def test_bad_timm_keywords_raise_clear_errors(keywords, error, message):
    with pytest.raises(error, match=message):
        timm.create_model("resnet18_mod", **keywords)


def test_device_and_dtype_keywords():
    model = timm.create_model("mobilenet_v2_mod", num_classes=3, device="cpu", dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.eval()(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_mobilenet_drop_rate_is_torchvisions_dropout():
    assert timm.create_model("mobilenet_v2_mod").classifier[0].p == 0.2  # torchvision's default
    assert timm.create_model("mobilenet_v2_mod", drop_rate=0.0).classifier[0].p == 0.0  # timm's train.py default
    with pytest.raises(ValueError, match="pass drop_rate"):
        timm.create_model("mobilenet_v2_mod", dropout=0.1)


def test_resnet_drop_rate_is_dropout_before_the_classifier():
    model = timm.create_model("resnet18_mod", num_classes=3, drop_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        features = model.forward_features(x)
        dropped = model.forward_head(features, pre_logits=True)
        kept_pooled = features.mean(dim=(2, 3))
    alive = kept_pooled != 0
    zeros = (dropped == 0) & alive
    assert 0.35 < float(zeros.sum() / alive.sum()) < 0.65  # about half of the nonzero features dropped
    torch.testing.assert_close(dropped[~zeros], 2 * kept_pooled[~zeros])  # the rest scaled by 1 / (1 - p)
    assert pooled.shape == (2, 512)


@pytest.mark.parametrize("name", ["resnet18_mod", "mobilenet_v2_mod"])
def test_drop_rate_is_off_in_eval_mode(name):
    torch.manual_seed(0)
    dropping = timm.create_model(name, num_classes=3, drop_rate=0.5).eval()
    torch.manual_seed(0)
    without = timm.create_model(name, num_classes=3, drop_rate=0.0).eval()
    for a, b in zip(dropping.state_dict().values(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # dropout has no weights and draws none
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        first, second = dropping(x), dropping(x)
        pooled = dropping.forward_head(dropping.forward_features(x), pre_logits=True)
        torch.testing.assert_close(first, second, rtol=0, atol=0)  # deterministic
        torch.testing.assert_close(first, without(x), rtol=0, atol=0)  # and nothing dropped or rescaled
        torch.testing.assert_close(pooled, without.forward_head(without.forward_features(x), pre_logits=True),
                                   rtol=0, atol=0)
    with torch.no_grad():
        features = dropping.forward_features(x)
        dropping.train()  # the check above can fail: on the same features, the training-mode head drops
        assert not torch.equal(dropping.forward_head(features, pre_logits=True), pooled)


@pytest.mark.parametrize("name", ["resnet18_mod", "mobilenet_v2_mod"])
def test_forward_features_head_and_reset_classifier(name):
    model = timm.create_model(name, num_classes=4).eval()
    width = NUM_FEATURES[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, width, 2, 2)  # reduction 32
        logits = model(x)
        torch.testing.assert_close(model.forward_head(features), logits, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), features.mean(dim=(2, 3)))
        torch.testing.assert_close(model.get_classifier()(features.mean(dim=(2, 3))), logits)

        model.reset_classifier(0)
        assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
        torch.testing.assert_close(model(x), features.mean(dim=(2, 3)))

        model.reset_classifier(3, global_pool="catavgmax")
        assert model.get_classifier().in_features == 2 * width == model.head_hidden_size
        both = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), both)
        assert model(x).shape == (2, 3)

        model.reset_classifier(0, global_pool="")  # unpooled features
        torch.testing.assert_close(model(x), features)
    with pytest.raises(ValueError, match="global_pool='' .* needs num_classes=0"):
        model.reset_classifier(5)  # keeps global_pool='', which needs no classifier


def _hook_every_module(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Forward hooks on every module of ``model``: the list fills with ``(name, output)`` per call."""
    calls: list[tuple[str, torch.Tensor]] = []
    for module_name, module in model.named_modules():
        module.register_forward_hook(
            lambda _m, _i, out, module_name=module_name: calls.append((module_name, out.detach().clone()))
        )
    return calls


@pytest.mark.parametrize("name", ["resnet18_mod", "mobilenet_v2_mod"])
def test_forward_hooks_fire_on_every_module_as_in_the_eager_model(name):
    torch.manual_seed(0)
    eager = MOD_BUILDERS[name](num_classes=3).eval()
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3).eval()
    eager_calls, timm_calls = _hook_every_module(eager), _hook_every_module(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=0, atol=0)
    # The stage containers (layer1 .. layer4, features) and every module inside them fire, in the eager
    # order, with the eager outputs; only the pooling differs (timm's pool flattens and has children).
    eager_modules = dict(eager.named_modules())
    common = [(n, out) for n, out in timm_calls if n in eager_modules and not n.startswith(("avgpool", "global"))]
    expected = [(n, out) for n, out in eager_calls if not n.startswith("avgpool")]
    assert [n for n, _ in common] == [n for n, _ in expected]
    stages = ["layer1", "layer2", "layer3", "layer4"] if name.startswith("resnet") else ["features"]
    assert all(stage in [n for n, _ in common] for stage in stages)
    for (module_name, out), (_, eager_out) in zip(common, expected):
        torch.testing.assert_close(out, eager_out, rtol=0, atol=0, msg=module_name)


def test_group_matcher_drives_timms_layer_decay():
    model = timm.create_model("resnet18_mod", num_classes=3)
    optimizer = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.5)
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    # stem + 8 blocks (2 per stage) + the head: 10 layers, lr scaled by 0.5 ** (10 - 1 - depth)
    assert len(scales) == 10 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.5**9)


# ----------------------------------------------------------------------------------------------
# features_only
# ----------------------------------------------------------------------------------------------


RESNET_FEATURE_MODULES = ["relu", "layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize(
    "name, kwargs, channels, reductions, modules",
    [
        ("resnet50_mod", {}, [64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32], RESNET_FEATURE_MODULES),
        ("resnet50_mod", {"replace_stride_with_dilation": [False, True, True]}, [64, 256, 512, 1024, 2048],
         [2, 4, 8, 8, 8], RESNET_FEATURE_MODULES),
        ("mobilenet_v2_mod_l", {}, [16, 32, 64, 128, 320], [2, 4, 8, 16, 32],
         ["features.1", "features.3", "features.6", "features.13", "features.17"]),
    ],
)
@pytest.mark.parametrize("feature_cls", ["list", "hook", "getter"])
def test_features_only_matches_hooked_features(name, kwargs, channels, reductions, modules, feature_cls):
    torch.manual_seed(0)
    extractor = timm.create_model(name, features_only=True, feature_cls=feature_cls, **kwargs).eval()
    torch.manual_seed(0)
    reference = MOD_BUILDERS[name](**kwargs).eval()
    assert extractor.feature_info.channels() == channels
    assert extractor.feature_info.reduction() == reductions
    assert extractor.feature_info.module_name() == modules

    captured = {}
    for module in modules:
        reference.get_submodule(module).register_forward_hook(
            lambda _m, _i, out, module=module: captured.__setitem__(module, out.clone())
        )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference(x)
        features = extractor(x)
    assert [tuple(f.shape) for f in features] == [(2, c, 64 // r, 64 // r) for c, r in zip(channels, reductions)]
    for module, feature in zip(modules, features):
        torch.testing.assert_close(feature, captured[module], rtol=0, atol=0, msg=module)

    # Every returned feature feeds a standard block, so MoD blocks writing in place never overwrite one.
    for block in extractor.modules():
        if isinstance(block, MoDBlock):
            block.inplace = True
    with torch.no_grad():
        in_place = extractor(x)
    for module, feature, again in zip(modules, features, in_place):
        torch.testing.assert_close(again, feature, rtol=0, atol=0, msg=module)


# ----------------------------------------------------------------------------------------------
# forward_intermediates, prune_intermediate_layers (timm's feature API; feature_cls="getter")
# ----------------------------------------------------------------------------------------------

# variant: (feature modules of the plain model, channels, reductions), written out from the architectures
INTERMEDIATES = {
    "resnet18_mod": (RESNET_FEATURE_MODULES, [64, 64, 128, 256, 512], [2, 4, 8, 16, 32]),
    "resnet50_mod": (RESNET_FEATURE_MODULES, [64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32]),
    "mobilenet_v2_mod": (["features.1", "features.3", "features.6", "features.13", "features.17"],
                         [16, 24, 32, 96, 320], [2, 4, 8, 16, 32]),
    "mobilenet_v2_mod_l": (["features.1", "features.3", "features.6", "features.13", "features.17"],
                           [16, 32, 64, 128, 320], [2, 4, 8, 16, 32]),
}


def _hooked(model: nn.Module, modules: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of ``modules`` in one eager forward of ``model`` (forward hooks, cloned at once)."""
    captured = {}
    handles = [model.get_submodule(m).register_forward_hook(
        lambda _m, _i, out, m=m: captured.__setitem__(m, out.clone())) for m in modules]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return [captured[m] for m in modules]


@pytest.mark.parametrize("name", list(INTERMEDIATES))
def test_forward_intermediates_as_timms_own_tests_check_it(name):
    modules, channels, reductions = INTERMEDIATES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3).eval()
    torch.manual_seed(0)
    plain = MOD_BUILDERS[name](num_classes=3).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert info.channels() == channels and info.reduction() == reductions
    x = torch.randn(1, 3, 64, 64)
    output, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    assert [tuple(t.shape) for t in intermediates] == [(1, c, 64 // r, 64 // r) for c, r in zip(channels, reductions)]
    for module, feature, expected in zip(modules, intermediates, _hooked(plain, modules, x), strict=True):
        torch.testing.assert_close(feature, expected, rtol=0, atol=0, msg=module)
    torch.testing.assert_close(output, model.forward_features(x), rtol=0, atol=0)
    model.set_grad_checkpointing()  # timm's test: the checkpointed path gives the same output
    again, checkpointed = model.forward_intermediates(x)
    torch.testing.assert_close(again, output, rtol=0, atol=0)
    for a, b in zip(checkpointed, intermediates, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet18_mod", "mobilenet_v2_mod"])
def test_forward_intermediates_indices_stop_early_and_intermediates_only(name):
    model = timm.create_model(name, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, every = model.forward_intermediates(x)
        assert len(every) == 5
        for indices, taken in ((2, [3, 4]), ([0, -1], [0, 4]), ((1, 3), [1, 3]), (None, [0, 1, 2, 3, 4])):
            only = model.forward_intermediates(x, indices=indices, intermediates_only=True)
            assert len(only) == len(taken)
            for t, i in zip(only, taken, strict=True):
                torch.testing.assert_close(t, every[i], rtol=0, atol=0)
        last, early = model.forward_intermediates(x, indices=[1, 2], stop_early=True, norm=True)
        torch.testing.assert_close(last, every[2], rtol=0, atol=0)  # nothing after the last index ran
        assert [tuple(t.shape) for t in early] == [tuple(every[1].shape), tuple(every[2].shape)]


@pytest.mark.parametrize("keywords, error, message", [
    ({"indices": 6}, ValueError, r"indices must be .* 5 feature maps, got 6"),
    ({"indices": [0, 5]}, ValueError, r"indices must be .* 5 feature maps, got \[0, 5\]"),
    ({"indices": 0}, ValueError, "indices must be"),
    ({"indices": "all"}, ValueError, "indices must be"),
    ({"output_fmt": "NHWC"}, ValueError, "output_fmt must be 'NCHW'"),
])
def test_forward_intermediates_rejects_bad_arguments(keywords, error, message):
    model = timm.create_model("resnet18_mod", num_classes=3)
    with pytest.raises(error, match=message):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), **keywords)


def test_prune_intermediate_layers_refuses_bad_indices_and_changes_nothing():
    model = timm.create_model("resnet18_mod", num_classes=3)
    before = list(model.state_dict())
    with pytest.raises(ValueError, match=r"indices must be .* 5 feature maps, got \(2, 7\)"):
        model.prune_intermediate_layers((2, 7))
    assert list(model.state_dict()) == before and model.num_classes == 3


@pytest.mark.parametrize("name, indices, kept, width", [
    ("resnet18_mod", (1, 2), ["layer1", "layer2"], 128),
    ("resnet18_mod", (4,), ["layer1", "layer2", "layer3", "layer4"], 512),
    ("mobilenet_v2_mod", (0, 2), 7, 32),
    ("mobilenet_v2_mod", (4,), 18, 320),
])
def test_prune_intermediate_layers_keeps_what_the_indices_need(name, indices, kept, width):
    model = timm.create_model(name, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    assert model.prune_intermediate_layers(indices) == list(indices)
    if name.startswith("resnet"):  # later stages emptied (as in timm's ResNet), the head gone
        assert [s for s in RESNET_FEATURE_MODULES[1:] if len(model.get_submodule(s))] == kept
    else:  # the blocks after the last index and the head convolution cut off
        assert len(model.features) == kept
    assert model.num_classes == 0 and model.num_features == width
    with torch.no_grad():
        for a, b in zip(model.forward_intermediates(x, indices=indices, intermediates_only=True), expected,
                        strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(model(x), expected[-1], rtol=0, atol=0)  # no head: the last kept features
    if indices[-1] < 4:  # a map that was pruned is refused, never computed from what is left
        with pytest.raises(ValueError, match=r"feature maps \[4\] .* were removed by prune_intermediate_layers"):
            model.forward_intermediates(x, indices=[4])


def test_getter_features_with_out_indices_and_training():
    torch.manual_seed(0)
    getter = timm.create_model("resnet50_mod", features_only=True, feature_cls="getter", out_indices=(1, 3))
    torch.manual_seed(0)
    listed = timm.create_model("resnet50_mod", features_only=True, out_indices=(1, 3))
    assert type(getter).__name__ == "FeatureGetterNet"
    assert getter.feature_info.channels() == [256, 1024] and getter.feature_info.reduction() == [4, 16]
    assert len(getter.model.layer4) == 0  # pruned: nothing after layer3 is built into the getter
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(getter.eval()(x), listed.eval()(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    getter.train()
    sum(f.mean() for f in getter(x)).backward()
    assert getter.model.layer1[1].router.fc1.weight.grad is not None


@pytest.mark.parametrize("name", ["resnet18_mod", "mobilenet_v2_mod"])
def test_features_only_with_a_feature_cfg_merges_it_as_timm_does(name):
    torch.manual_seed(0)
    by_cfg = timm.create_model(name, features_only=True, feature_cfg=dict(feature_cls="hook", out_indices=(1, 3)))
    torch.manual_seed(0)
    by_keywords = timm.create_model(name, features_only=True, feature_cls="hook", out_indices=(1, 3))
    assert type(by_cfg) is type(by_keywords) is timm.models.FeatureHookNet
    assert by_cfg.feature_info.reduction() == by_keywords.feature_info.reduction() == [4, 16]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(by_cfg.eval()(x), by_keywords.eval()(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # out_indices as a keyword wins over the feature_cfg's, as in timm's build_model_with_cfg
    assert timm.create_model(name, features_only=True, feature_cfg=dict(out_indices=(1,)),
                             out_indices=(2,)).feature_info.reduction() == [8]
    with pytest.raises(TypeError, match="feature_cfg must be a dict"):
        timm.create_model(name, features_only=True, feature_cfg="hook")


# (variant, timm's own model with the same stage layout, output stride): the dilation timm puts in every
# standard block's convolutions is the expectation.
@pytest.mark.parametrize("name, baseline, output_stride", [
    ("resnet18_mod", "resnet18", 16), ("resnet18_mod", "resnet18", 8), ("resnet50_mod", "resnet50", 16),
    ("resnet50_mod", "resnet50", 8), ("resnet50_mod", "resnet50", 32),
])
def test_output_stride_dilates_like_timms_resnet(name, baseline, output_stride):
    model = timm.create_model(name, num_classes=3, output_stride=output_stride).eval()
    reference = timm.create_model(baseline, num_classes=3, output_stride=output_stride)
    reference_convs = dict(reference.named_modules())
    standard_convs = [(n, m) for n, m in model.named_modules()
                      if isinstance(m, nn.Conv2d) and not any(n.startswith(b + ".") for b in _mod_block_names(model))]
    assert len(standard_convs) > 10
    for conv_name, conv in standard_convs:
        expected = reference_convs[conv_name]
        assert (conv.stride, conv.dilation, conv.padding) == (expected.stride, expected.dilation, expected.padding), \
            conv_name
    # A MoD block takes the dilation of the standard blocks of its stage.
    for block_name in _mod_block_names(model):
        stage = block_name.split(".")[0]
        assert model.get_submodule(block_name).dilation == reference_convs[f"{stage}.1.conv2"].dilation[0]
    assert [i["reduction"] for i in model.feature_info] == [i["reduction"] for i in reference.feature_info]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model.forward_features(x).shape[-1] == 64 // output_stride
    features = timm.create_model(name, features_only=True, output_stride=output_stride)
    assert features.feature_info.reduction() == [i["reduction"] for i in reference.feature_info]


def test_output_stride_equals_replace_stride_with_dilation():
    x = torch.randn(2, 3, 64, 64)
    for output_stride, dilated in ((16, [False, False, True]), (8, [False, True, True])):
        torch.manual_seed(0)
        by_stride = timm.create_model("resnet50_mod", num_classes=3, output_stride=output_stride).eval()
        torch.manual_seed(0)
        by_flags = timm.create_model("resnet50_mod", num_classes=3, replace_stride_with_dilation=dilated).eval()
        with torch.no_grad():
            torch.testing.assert_close(by_stride(x), by_flags(x), rtol=0, atol=0)


@pytest.mark.parametrize("keywords, message", [
    ({"output_stride": 4}, r"output_stride must be 8, 16 or 32, got 4"),
    ({"output_stride": 16, "replace_stride_with_dilation": [False, True, True]},
     r"output_stride=16 asks for replace_stride_with_dilation=\[False, False, True\]"),
])
def test_bad_output_stride_raises_clear_errors(keywords, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model("resnet50_mod", **keywords)


def test_mobilenet_output_stride_is_refused_clearly():
    assert timm.create_model("mobilenet_v2_mod", output_stride=32).feature_info[-1]["reduction"] == 32
    with pytest.raises(ValueError, match=r"output_stride=16: .*MobileNetV2 has no dilated form"):
        timm.create_model("mobilenet_v2_mod", output_stride=16)


def test_features_only_fx_and_out_indices():
    torch.manual_seed(0)
    by_fx = timm.create_model("resnet18_mod", features_only=True, feature_cls="fx", out_indices=(2, 4)).eval()
    torch.manual_seed(0)
    by_list = timm.create_model("resnet18_mod", features_only=True, out_indices=(2, 4)).eval()
    assert by_fx.feature_info.channels() == [128, 512]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(by_fx(x), by_list(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Gradient checkpointing
# ----------------------------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["non-reentrant", "reentrant"])
def reentrant(request):
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(request.param)
    yield request.param
    set_reentrant_ckpt(before)


@pytest.mark.parametrize(
    "name, router", [("resnet18_mod", "learned"), ("resnet18_mod", "random"), ("mobilenet_v2_mod", "learned")]
)
def test_grad_checkpointing_gives_the_same_gradients(name, router, reentrant):
    model = timm.create_model(name, num_classes=4, router=router).train()
    block = model.get_submodule(_mod_block_names(model)[1])
    calls = []
    block.register_forward_pre_hook(lambda *_: calls.append(1))  # (a rerun may stop before the forward returns)
    x = torch.randn(2, 3, 32, 32)
    results = {}
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        calls.clear()
        torch.manual_seed(1)  # the random router draws the same channels; checkpointing replays the RNG
        out = model(x)
        out.square().sum().backward()
        results[checkpointing] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls))
    assert results[False][2] == 1 and results[True][2] == 2  # checkpointed: the block ran again in backward
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    for key, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][key], grad, rtol=1e-6, atol=1e-7, msg=key)


def test_grad_checkpointing_refuses_blocks_that_write_in_place(reentrant):
    model = timm.create_model("resnet18_mod", num_classes=4, inplace=True)
    first_three = r"\['layer1.1', 'layer2.1', 'layer3.1'\]"
    with pytest.raises(ValueError, match=rf"gradient checkpointing needs MoD blocks .* {first_three}"):
        model.set_grad_checkpointing(True)
    disable_inplace(model)
    model.set_grad_checkpointing(True)
    model.layer4[1].inplace = True  # switched on later: the next training forward refuses
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\['layer4.1'\] have inplace=True"):
        model(x)
    with torch.no_grad():  # nothing is checkpointed for backward here
        assert model(x).shape == (2, 4)
    with pytest.raises(TypeError, match="enable must be True or False"):
        model.set_grad_checkpointing("yes")


# ----------------------------------------------------------------------------------------------
# timm's training utilities
# ----------------------------------------------------------------------------------------------


def test_training_steps_with_timms_data_optimizer_loss_and_ema(tmp_path):
    write_image_folder(SyntheticShapes(8, image_size=32, num_classes=2, seed=0), tmp_path / "train")
    dataset = timm.data.create_dataset("", root=str(tmp_path), split="train", is_training=True)
    assert len(dataset) == 8
    model = timm.create_model("resnet18_mod", num_classes=2)
    data_config = timm.data.resolve_data_config({"input_size": (3, 32, 32)}, model=model)
    loader = timm.data.create_loader(
        dataset, input_size=data_config["input_size"], batch_size=4, is_training=True,
        interpolation=data_config["interpolation"], mean=data_config["mean"], std=data_config["std"],
        crop_pct=data_config["crop_pct"], num_workers=0, use_prefetcher=False, device=torch.device("cpu"),
        persistent_workers=False,
    )
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)

    optimizer = timm.optim.create_optimizer_v2(model, "sgd", lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = timm.loss.LabelSmoothingCrossEntropy(smoothing=0.1)
    decay = 0.5
    ema = timm.utils.ModelEmaV3(model, decay=decay)
    expected_ema = {key: value.clone() for key, value in model.state_dict().items()}
    model.train()
    losses = []
    for _ in range(6):  # a fixed batch from timm's loader: the loss must fall
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)  # no step: the constant decay (with a step, timm copies for the first updates)
        losses.append(loss.item())
        for key, value in model.state_dict().items():  # EMA by hand: lerp floats, copy counters
            if value.is_floating_point():
                expected_ema[key] = decay * expected_ema[key] + (1 - decay) * value
            else:
                expected_ema[key] = value.clone()
    assert losses[-1] < 0.7 * losses[0], losses
    for key, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, expected_ema[key], rtol=1e-5, atol=1e-6, msg=key)
    assert _mod_block_names(ema.module) == _mod_block_names(model)
    with torch.no_grad():
        assert ema.module.eval()(images).shape == (4, 2)
    for batch_images, batch_labels in loader:  # the loader's whole epoch goes through the model
        assert model(batch_images).shape == (batch_images.shape[0], 2) and batch_labels.max() <= 1


# ----------------------------------------------------------------------------------------------
# Optional dependency and the launcher for timm's scripts
# ----------------------------------------------------------------------------------------------


def _run_python(code_or_args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, *code_or_args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_timm_stays_optional_for_the_rest_of_the_package(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        sys.modules["timm"] = None  # as if timm were not installed
        import mod_models, mod_models.integrations.detection, mod_models.integrations.segmentation, """
        """mod_models.integrations.features
        model = mod_models.resnet18_mod(num_classes=3)
        try:
            import mod_models.integrations.timm
        except ImportError as error:
            print("ImportError:", error)
        """
    )
    result = _run_python(["-c", code], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ImportError: mod_models.integrations.timm needs timm (pip install timm)" in result.stdout


# The launcher the README gives for timm's train.py / benchmark.py / validate.py.
LAUNCHER = """\
import runpy, sys
import mod_models.integrations.timm  # registers resnet18_mod ... mobilenet_v2_mod_l with timm
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


def test_readme_launcher_runs_a_timm_script(tmp_path):
    (tmp_path / "timm_mod.py").write_text(LAUNCHER)
    (tmp_path / "script.py").write_text(textwrap.dedent(
        """
        import argparse, timm, torch
        parser = argparse.ArgumentParser()
        parser.add_argument("--model")
        parser.add_argument("--num-classes", type=int)
        args = parser.parse_args()
        model = timm.create_model(args.model, num_classes=args.num_classes, drop_rate=0.0, drop_path_rate=None)
        print(type(model).__name__, model.num_classes, tuple(model(torch.randn(2, 3, 32, 32)).shape))
        """
    ))
    result = _run_python(["timm_mod.py", "script.py", "--model", "resnet18_mod", "--num-classes", "3"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "TimmMoDResNet 3 (2, 3)"
