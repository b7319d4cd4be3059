"""Tests for fedquant.fakequant.

Format arithmetic against brute-force oracles, exact per-sample gradients through
Opacus's hooks path, and layer switching after wrapping.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample import grad_sample_module as gsm_mod
from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.utils.per_sample_gradients_utils import (
    ModelWithLoss,
    check_per_sample_gradients_are_correct,
    compute_microbatch_grad_sample,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedquant.fakequant as fq
from fedquant.config import ModelName
from fedquant.fakequant import (
    ActScale,
    QConv2d,
    QLinear,
    QuantFormat,
    fake_quantize,
    quantizable_layers,
    quantize_values,
    quantized_indices,
    set_quantized,
)
from fedquant.models import build_model

FORMATS = list(QuantFormat)
FORMATS_OR_NONE = [None, *FORMATS]
INT_LEVELS = {QuantFormat.INT8: 127, QuantFormat.INT4: 7}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sample(shape: tuple[int, ...], seed: int, dtype=torch.float32) -> torch.Tensor:
    """Heavy-ish tailed values spanning several octaves, so every FP4 level is hit."""
    g = _gen(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-8, 2, shape, generator=g).double())
    return x.to(dtype)


# --- format arithmetic ----------------------------------------------------------------------


def _oracle(x: torch.Tensor, fmt: QuantFormat, alpha: float) -> torch.Tensor:
    """Brute force: nearest level by enumeration (linear domain for INT, log2 for FP4)."""
    x64 = x.double().flatten()
    if fmt in INT_LEVELS:
        n = INT_LEVELS[fmt]
        levels = torch.arange(-n, n + 1, dtype=torch.float64) * (alpha / n)
        idx = (x64[:, None] - levels[None, :]).abs().argmin(dim=1)
        return levels[idx].view_as(x)
    mags = alpha * torch.exp2(-torch.arange(0, 7, dtype=torch.float64))  # α 2^-j, j = 0..6
    dist = (torch.log2(x64.abs().clamp_min(1e-300))[:, None] - torch.log2(mags)[None, :]).abs()
    out = torch.sign(x64) * mags[dist.argmin(dim=1)]
    out[x64.abs() < alpha * 2.0**-7] = 0.0
    return out.view_as(x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_values_matches_brute_force_oracle(fmt: QuantFormat) -> None:
    x = _sample((4000,), seed=1, dtype=torch.float64)
    alpha = float(x.abs().max())
    q = quantize_values(x, fmt=fmt, scale=torch.tensor(alpha, dtype=torch.float64))
    torch.testing.assert_close(q, _oracle(x, fmt, alpha), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("fmt", list(INT_LEVELS))
def test_int_formats_lie_on_grid_with_half_step_error(fmt: QuantFormat) -> None:
    n = INT_LEVELS[fmt]
    x = _sample((5000,), seed=2)
    alpha = x.abs().max()
    step = alpha / n
    q = quantize_values(x, fmt=fmt, scale=alpha)
    k = q / step
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert int(k.round().abs().max()) == n  # the max maps to ±α
    assert float((x - q).abs().max()) <= float(step) / 2 * (1 + 1e-5)
    # saturation: values beyond α (fixed scale) clip to ±α
    big = quantize_values(torch.tensor([3.0, -3.0]), fmt=fmt, scale=torch.tensor(1.0))
    assert torch.allclose(big, torch.tensor([1.0, -1.0]))


def test_fp4_levels_and_flush_threshold() -> None:
    x = _sample((5000,), seed=3)
    alpha = x.abs().max()
    q = quantize_values(x, fmt=QuantFormat.FP4, scale=alpha)
    allowed = torch.cat([torch.zeros(1), alpha * torch.exp2(-torch.arange(0.0, 7.0))])
    assert torch.isin(q.abs(), allowed).all()
    used = set(torch.unique(q.abs()).tolist())
    assert len(used) == 8  # every level, 0 included, is reached by this sample
    nonzero = q != 0
    assert (torch.sign(q[nonzero]) == torch.sign(x[nonzero])).all()
    # log-domain nearest: |log2|x| - log2|q|| <= 1/2 where |x| >= α 2^-6
    inside = x.abs() >= alpha * 2.0**-6
    gap = (torch.log2(x[inside].abs()) - torch.log2(q[inside].abs())).abs()
    assert float(gap.max()) <= 0.5 + 1e-6
    # flush below α 2^-7, smallest level at and above it
    a = torch.tensor(1.0)
    edge = torch.tensor([0.99 * 2.0**-7, 2.0**-7, 1.01 * 2.0**-7, 0.0])
    flushed = quantize_values(edge, fmt=QuantFormat.FP4, scale=a)
    assert flushed.tolist() == [0.0, 2.0**-6, 2.0**-6, 0.0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_is_idempotent(fmt: QuantFormat) -> None:
    x = _sample((3000,), seed=4)
    scale = x.abs().max()
    q = quantize_values(x, fmt=fmt, scale=scale)
    assert torch.equal(quantize_values(q, fmt=fmt, scale=scale), q)


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_scale_and_zero_tensor_give_zeros(fmt: QuantFormat) -> None:
    zeros = torch.zeros(5, 7)
    assert torch.equal(quantize_values(zeros, fmt=fmt, scale=torch.tensor(0.0)), zeros)
    # per-row scale with one all-zero row: that row is 0, no NaN anywhere
    x = _sample((3, 7), seed=5)
    x[1] = 0.0
    scale = x.abs().amax(dim=1, keepdim=True)
    q = quantize_values(x, fmt=fmt, scale=scale)
    assert torch.isfinite(q).all()
    assert torch.equal(q[1], torch.zeros(7))
    # a Q-layer fed an all-zero sample stays finite, and so do its gradients
    layer = QLinear(7, 3, quant_format=fmt)
    xr = x.clone().requires_grad_(True)
    layer(xr).sum().backward()
    assert torch.isfinite(xr.grad).all() and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quantize_forward_exact_and_gradient_identity(fmt: QuantFormat) -> None:
    x = _sample((6, 9), seed=6).requires_grad_(True)
    scale = x.detach().abs().amax(dim=1, keepdim=True)
    y = fake_quantize(x, fmt=fmt, scale=scale)
    assert torch.equal(y.detach(), quantize_values(x.detach(), fmt=fmt, scale=scale))
    assert not torch.equal(y.detach(), x.detach())  # it does quantize
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# --- layers -----------------------------------------------------------------------------------


def test_unquantized_layers_equal_torch_layers() -> None:
    torch.manual_seed(0)
    ql, qc = QLinear(12, 5), QConv2d(3, 4, 3, stride=2, padding=1)
    lin, conv = nn.Linear(12, 5), nn.Conv2d(3, 4, 3, stride=2, padding=1)
    lin.load_state_dict(ql.state_dict())
    conv.load_state_dict(qc.state_dict())
    x, img = _sample((4, 12), seed=7), _sample((2, 3, 9, 9), seed=8)
    assert torch.equal(ql(x), lin(x))
    assert torch.equal(qc(img), conv(img))
    assert list(ql.buffers()) == [] and list(qc.buffers()) == []


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act_scale", list(ActScale))
def test_quantized_forward_matches_formula(fmt: QuantFormat, act_scale: ActScale) -> None:
    torch.manual_seed(1)
    qc = QConv2d(3, 4, 3, padding=1, quant_format=fmt, act_scale=act_scale, act_clip=2.0)
    img = _sample((2, 3, 6, 6), seed=9)
    if act_scale is ActScale.PER_SAMPLE:
        a = img.abs().amax(dim=(1, 2, 3), keepdim=True)
    else:
        a = torch.tensor(2.0)
    w_q = quantize_values(qc.weight.detach(), fmt=fmt, scale=qc.weight.detach().abs().max())
    expected = F.conv2d(quantize_values(img, fmt=fmt, scale=a), w_q, qc.bias, padding=1)
    assert torch.equal(qc(img), expected)
    assert list(qc.buffers()) == []


def test_invalid_layer_arguments_raise() -> None:
    with pytest.raises(ValueError, match="act_clip"):
        QLinear(2, 2, act_clip=0.0)
    with pytest.raises(ValueError, match="quant_format"):
        QLinear(2, 2, quant_format="int4")  # type: ignore[arg-type]


def test_per_sample_scale_does_not_couple_samples() -> None:
    torch.manual_seed(2)
    layer = QLinear(16, 8, quant_format=QuantFormat.INT4)
    x = _sample((2, 16), seed=10)
    x[1] = 1e4 * x[1]  # a sample of huge magnitude
    assert torch.equal(layer.quantized_input(x)[:1], layer.quantized_input(x[:1]))
    alone = layer(x[:1])
    together = layer(x)[:1]
    # equal up to the matmul's batch-size-dependent summation order
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0.0)
    # control: under a per-batch scale sample 0 would be flushed and its output changed
    w = layer.weight.detach()
    w_q = quantize_values(w, fmt=QuantFormat.INT4, scale=w.abs().max())
    x_batch_scaled = quantize_values(x, fmt=QuantFormat.INT4, scale=x.abs().max())
    coupled = F.linear(x_batch_scaled[:1], w_q, layer.bias)
    assert not torch.allclose(coupled, alone, atol=1e-3)


# --- helpers --------------------------------------------------------------------------------


def test_set_quantized_and_quantized_indices() -> None:
    model = build_model(ModelName.RESNET, seed=0)
    names = [name for name, _ in quantizable_layers(model)]
    assert names == [name for name, m in model.named_modules() if isinstance(m, QLinear | QConv2d)]
    assert quantized_indices(model) == []
    set_quantized(model, [0, 3, 9], QuantFormat.FP4)
    assert quantized_indices(model) == [0, 3, 9]
    assert quantizable_layers(model)[3][1].quant_format is QuantFormat.FP4
    set_quantized(model, [1], QuantFormat.INT8)  # all others reset to None
    assert quantized_indices(model) == [1]
    set_quantized(model, range(10), None)
    assert quantized_indices(model) == []
    with pytest.raises(ValueError, match="indices"):
        set_quantized(model, [10], QuantFormat.INT4)
    with pytest.raises(ValueError, match="indices"):
        set_quantized(model, [-1], QuantFormat.INT4)
    with pytest.raises(ValueError, match="fmt"):
        set_quantized(model, [0], "int4")  # type: ignore[arg-type]


# --- Opacus: per-sample gradients ---------------------------------------------------------------


def _tiny_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        QConv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        QConv2d(4, 6, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        QLinear(6 * 3 * 3, 5),
        nn.ReLU(),
        QLinear(5, 3),
    )


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(4)
    if kind == "linear":
        return QLinear(10, 6), _sample((5, 10), seed=11)
    if kind == "linear3d":  # (B, T, F) inputs: per-sample scale over T and F
        return QLinear(10, 6), _sample((4, 3, 10), seed=12)
    if kind == "conv":
        return QConv2d(3, 5, 3, stride=2, padding=1), _sample((4, 3, 7, 7), seed=13)
    if kind == "conv_groups":
        return QConv2d(4, 6, 3, padding="same", groups=2, dilation=2), _sample((3, 4, 8, 8), 14)
    if kind == "conv_reflect":
        return QConv2d(2, 3, 3, padding=1, padding_mode="reflect"), _sample((3, 2, 6, 6), 15)
    raise AssertionError(kind)


LAYER_KINDS = ["linear", "linear3d", "conv", "conv_groups", "conv_reflect"]


@pytest.mark.parametrize("fmt", FORMATS_OR_NONE)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_per_sample_gradients_exact_single_layers(kind: str, fmt: QuantFormat | None) -> None:
    layer, x = _layer(kind)
    layer.quant_format = fmt
    # checks loss_reduction "sum" and "mean" against micro-batches
    assert check_per_sample_gradients_are_correct(
        x, layer, batch_first=True, atol=1e-5, rtol=1e-4, grad_sample_mode="hooks"
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_per_sample_gradients_exact_fixed_scale(kind: str, fmt: QuantFormat) -> None:
    layer, x = _layer(kind)
    layer.quant_format, layer.act_scale, layer.act_clip = fmt, ActScale.FIXED, 0.5
    assert float(x.abs().max()) > 0.5  # some inputs saturate
    assert check_per_sample_gradients_are_correct(
        x, layer, batch_first=True, atol=1e-5, rtol=1e-4, grad_sample_mode="hooks"
    )


@pytest.mark.parametrize("fmt", FORMATS_OR_NONE)
@pytest.mark.parametrize("name", list(ModelName))
def test_per_sample_gradients_exact_full_models(name: ModelName, fmt: QuantFormat | None) -> None:
    # float64 so that batch-vs-microbatch rounding differences cannot flip a quantization level
    model = build_model(name, seed=5).double()
    set_quantized(model, range(len(quantizable_layers(model))), fmt)
    x = torch.randn(3, 1, 28, 28, generator=_gen(16), dtype=torch.float64)
    assert check_per_sample_gradients_are_correct(
        x, model, batch_first=True, atol=1e-9, rtol=1e-7, grad_sample_mode="hooks"
    )


@pytest.mark.parametrize("name", list(ModelName))
def test_per_sample_gradients_exact_full_models_fixed_scale(name: ModelName) -> None:
    model = build_model(name, seed=6).double()
    for _, layer in quantizable_layers(model):
        layer.act_scale, layer.act_clip = ActScale.FIXED, 1.0
    set_quantized(model, range(0, len(quantizable_layers(model)), 2), QuantFormat.INT4)
    x = torch.randn(3, 1, 28, 28, generator=_gen(17), dtype=torch.float64)
    assert check_per_sample_gradients_are_correct(
        x, model, batch_first=True, atol=1e-9, rtol=1e-7, grad_sample_mode="hooks"
    )


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_functorch_fallback_also_exact(kind: str) -> None:
    """The STE is functorch-compatible too (used only under force_functorch)."""
    layer, x = _layer(kind)
    layer.quant_format = QuantFormat.FP4
    assert check_per_sample_gradients_are_correct(
        x, layer, batch_first=True, atol=1e-5, rtol=1e-4, grad_sample_mode="functorch"
    )


def test_check_fails_if_sampler_ignores_quantization(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: Opacus's stock linear sampler (unquantized input) is wrong here."""
    layer, x = _layer("linear")
    layer.quant_format = QuantFormat.INT4
    monkeypatch.setitem(GradSampleModule.GRAD_SAMPLERS, QLinear, compute_linear_grad_sample)
    assert not check_per_sample_gradients_are_correct(
        x, layer, batch_first=True, atol=1e-5, rtol=1e-4, grad_sample_mode="hooks"
    )


def test_check_fails_with_per_batch_activation_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a per-batch scale couples samples and breaks per-sample gradients."""
    layer, x = _layer("linear")
    x[0] *= 50.0
    layer.quant_format = QuantFormat.INT4
    monkeypatch.setattr(fq, "_activation_scale", lambda x, *_: x.detach().abs().amax())
    assert not check_per_sample_gradients_are_correct(
        x, layer, batch_first=True, atol=1e-5, rtol=1e-4, grad_sample_mode="hooks"
    )


def test_hooks_path_is_used_not_functorch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GradSampleModule.GRAD_SAMPLERS[QLinear] is fq.compute_qlinear_grad_sample
    assert GradSampleModule.GRAD_SAMPLERS[QConv2d] is fq.compute_qconv2d_grad_sample
    fallback_calls: list[type] = []
    real_fallback = gsm_mod.ft_compute_per_sample_gradient

    def spy(layer, activations, backprops):
        fallback_calls.append(type(layer))
        return real_fallback(layer, activations, backprops)

    monkeypatch.setattr(gsm_mod, "ft_compute_per_sample_gradient", spy)
    model = build_model(ModelName.RESNET, seed=7)
    set_quantized(model, [0, 5, 9], QuantFormat.INT4)
    gsm = GradSampleModule(model, force_functorch=False)
    gsm(torch.randn(2, 1, 28, 28, generator=_gen(18))).sum().backward()
    assert fallback_calls == []
    for _, layer in quantizable_layers(model):
        assert not hasattr(layer, "ft_compute_sample_grad")
        assert not hasattr(layer, "ft_compute_per_sample_gradient")
        assert layer.weight.grad_sample.shape == (2, *layer.weight.shape)


def test_switching_layers_after_wrapping_takes_effect() -> None:
    model = _tiny_net().double()
    reference = _tiny_net().double()  # same seed, never wrapped: the oracle
    x = torch.randn(4, 1, 8, 8, generator=_gen(19), dtype=torch.float64)
    gsm = GradSampleModule(model, loss_reduction="sum")
    with torch.no_grad():  # no hooks fire without grad
        out_fp = gsm(x)
    for indices, fmt in [([0, 3], QuantFormat.INT4), ([1, 2], QuantFormat.FP4), ([], None)]:
        set_quantized(model, indices, fmt)  # on the original model, after wrapping
        set_quantized(reference, indices, fmt)
        with torch.no_grad():
            out = gsm(x)
            assert torch.equal(out, reference(x))
            assert torch.equal(out, out_fp) == (fmt is None)
        gsm.zero_grad(set_to_none=True)
        ModelWithLoss(gsm, "sum")(x).backward()
        expected = compute_microbatch_grad_sample(x, reference, loss_reduction="sum")
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad_sample, expected[name], atol=1e-10, rtol=1e-8)


def test_switching_layers_after_make_private() -> None:
    model, reference = _tiny_net(), _tiny_net()
    g = _gen(20)
    images_all = torch.randn(32, 1, 8, 8, generator=g)
    data = TensorDataset(images_all, torch.randint(0, 3, (32,), generator=g))
    private_model, dp_optimizer, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=0.0,
        max_grad_norm=1e6,  # no clipping: the step is the plain mean of per-sample grads
        poisson_sampling=False,
    )
    assert isinstance(private_model, GradSampleModule)
    images, labels = next(iter(loader))
    with torch.no_grad():
        out_fp = private_model(images)
    set_quantized(model, [0, 2, 3], QuantFormat.INT4)
    set_quantized(reference, [0, 2, 3], QuantFormat.INT4)
    assert quantized_indices(private_model) == [0, 2, 3]
    with torch.no_grad():
        out_q = private_model(images)
        assert torch.equal(out_q, reference(images))
        assert not torch.equal(out_q, out_fp)

    # micro-batch reference: per-sample gradients of the cross-entropy, quantized model
    per_sample: dict[str, list[torch.Tensor]] = {n: [] for n, _ in reference.named_parameters()}
    for i in range(len(labels)):
        reference.zero_grad()
        F.cross_entropy(reference(images[i : i + 1]), labels[i : i + 1]).backward()
        for n, p in reference.named_parameters():
            per_sample[n].append(p.grad.clone())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    dp_optimizer.zero_grad()
    F.cross_entropy(private_model(images), labels).backward()
    for n, p in model.named_parameters():
        expected = torch.stack(per_sample[n])
        torch.testing.assert_close(p.grad_sample, expected, atol=1e-6, rtol=1e-5)
    dp_optimizer.step()
    for n, p in model.named_parameters():
        step = before[n] - 0.1 * torch.stack(per_sample[n]).mean(0)
        torch.testing.assert_close(p.detach(), step, atol=1e-6, rtol=1e-5)
