"""Post-training quantization (fedquant.ptq): quantizers, AdaRound, BRECQ, MRECG, export."""

from __future__ import annotations

import copy
import functools
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fedquant.data
from fedquant.config import (
    Calibration,
    Capacity,
    ModelName,
    PTQMethod,
    PTQSettings,
)
from fedquant.models import BasicBlock, build_model, evaluate
from fedquant.ptq import (
    PTQFileError,
    PTQLayer,
    PTQModel,
    PTQResult,
    group_units,
    load_quantized,
    quantize_model,
    save_quantized,
)
from fedquant.ptq.adaround import beta_at, initial_logits, rectified_sigmoid, rounding_regularizer
from fedquant.ptq.export import decode_quantized, encode_quantized
from fedquant.ptq.layers import ptq_layers, to_ptq_network
from fedquant.ptq.mrecg import data_dependent_capacity, data_free_capacities
from fedquant.ptq.quantizers import (
    ActivationQuantizer,
    affine_params,
    dequantize_affine,
    fake_quantize_affine,
    mse_weight_params,
    quantize_affine,
)
from fedquant.ptq.reconstruct import reconstruct, squared_error
from fedquant.ptq.units import reconstruction_units, run_units

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A CNN trained without DP in ~20 s: Adam (lr 3e-3, batch 128), one pass over 20,000
# training images, ~97.4 % test accuracy.
TRAIN_IMAGES, TRAIN_BATCH, TRAIN_LR = 20_000, 128, 3e-3


@pytest.fixture(scope="module")
def trained_cnn() -> nn.Module:
    model = build_model(ModelName.CNN, seed=0)
    train = fedquant.data.load_mnist().train
    images, labels = train.images[:TRAIN_IMAGES], train.labels[:TRAIN_IMAGES]
    optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
    order = torch.randperm(TRAIN_IMAGES, generator=torch.Generator().manual_seed(0))
    model.train()
    for start in range(0, TRAIN_IMAGES, TRAIN_BATCH):
        batch = order[start : start + TRAIN_BATCH]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()
    return model.eval()


def _network(result: PTQResult) -> nn.Module:
    assert isinstance(result.model, PTQModel)
    return result.model.network


def _images(count: int, seed: int = 0) -> torch.Tensor:
    """Normalized-MNIST-like random images (N, 1, 28, 28) (no data file needed)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(count, 1, 28, 28, generator=g) - 0.1307) / 0.3081


def _correlated(count: int, channels: int, size: int, *, seed: int) -> torch.Tensor:
    """Smooth, channel-mixed random features (N, C, size, size), like image features.

    Reconstruction needs correlated inputs: for white inputs ||W x - Ŵ x||² is a constant
    times ||W - Ŵ||², which round-to-nearest already minimizes.
    """
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=g) + 2.0  # (C, C)
    coarse = torch.randn(count, channels, size // 2, size // 2, generator=g)
    mixed = torch.einsum("ij,bjhw->bihw", mix, coarse)  # (N, C, size/2, size/2)
    return nn.functional.interpolate(mixed, size=(size, size), mode="bilinear")


# Quantizers ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_fake_quantize_equals_dequantize_of_quantize(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    weight = torch.randn(16, 8, 3, 3, generator=g) * torch.rand(16, 1, 1, 1, generator=g)
    weight[3] = weight[3].abs()  # a channel without negative weights: zero point 0
    weight[5] = 0.0  # an all-zero channel: the smallest step
    scale, zero_point = mse_weight_params(weight, bits=bits)  # (16,)
    scale, zero_point = scale.view(-1, 1, 1, 1), zero_point.view(-1, 1, 1, 1)
    codes = quantize_affine(weight, scale, zero_point, bits=bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    fake = fake_quantize_affine(weight, scale, zero_point, bits=bits)
    assert torch.equal(fake, dequantize_affine(codes, scale, zero_point))
    assert torch.equal(fake[5], torch.zeros_like(fake[5]))
    # nearest rounding: inside the range every error is at most half a step
    lo, hi = -scale * zero_point, scale * (2**bits - 1 - zero_point)
    inside = (weight >= lo) & (weight <= hi)
    assert bool(((weight - fake).abs() <= scale / 2 * (1 + 1e-6))[inside].all())


def test_mse_weight_range_is_never_worse_than_min_max() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 512, generator=g)  # Gaussian rows: clipping the tails pays off
    scale, zero_point = mse_weight_params(weight, bits=3)
    minmax_scale, minmax_zero = affine_params(weight.amin(1), weight.amax(1), bits=3)

    def error(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        fq = fake_quantize_affine(weight, s[:, None], z[:, None], bits=3)
        return (weight - fq).square().sum(1)  # (32,)

    searched, minmax = error(scale, zero_point), error(minmax_scale, minmax_zero)
    assert bool((searched <= minmax).all())
    assert float(searched.sum()) < 0.7 * float(minmax.sum())  # measured: 0.60


# AdaRound and block reconstruction ---------------------------------------------------


def test_adaround_pieces_match_the_paper() -> None:
    fraction = torch.linspace(0.0, 0.999, 101)
    h = rectified_sigmoid(initial_logits(fraction))
    assert torch.allclose(h, fraction, atol=1e-5)  # V starts at h(V) = frac(w / s)
    assert float(rectified_sigmoid(torch.tensor(0.0))) == pytest.approx(0.5)  # V >= 0: up
    assert float(rectified_sigmoid(torch.tensor([-50.0, 50.0])).sum()) == 1.0  # reaches 0, 1
    binary, soft = torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.0, 0.5, 1.0])
    assert float(rounding_regularizer(binary, beta=2.0)) == 0.0
    assert float(rounding_regularizer(soft, beta=2.0)) == 1.0  # 1 - |2 h - 1|^2 at h = 1/2
    betas = [beta_at(t, total=100) for t in range(100)]
    assert betas[:20] == [None] * 20  # 20 % warm-up without the regularizer
    assert betas[20] == 20.0 and betas[99] == pytest.approx(2.0 + 18.0 / 80)
    assert all(a > b for a, b in zip(betas[20:-1], betas[21:], strict=True))  # type: ignore[operator]


def test_adaround_hard_rounds_each_weight_down_or_up_and_beats_round_to_nearest() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    inputs = _correlated(128, 4, 8, seed=1)  # (N, 4, 8, 8)
    with torch.no_grad():
        targets = conv(inputs)
    layer = PTQLayer.from_float(conv, weight_bits=3)
    rtn_codes = layer.codes.clone()
    with torch.no_grad():
        rtn_loss = float(squared_error(layer(inputs), targets))
    scale = layer.weight_scale.view(-1, 1, 1, 1)  # (C_out, 1, 1, 1)
    zero_point = layer.weight_zero_point.view(-1, 1, 1, 1)
    floor = torch.floor(conv.weight.detach() / scale) + zero_point
    reconstruct(
        [layer],
        layer,
        inputs=inputs,
        float_inputs=inputs,
        targets=targets,
        iterations=400,
        learn_activation_steps=False,
        keep_quantized=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert layer.adaround is None
    # hard rounding: h ends in {0, 1}, each weight on its grid floor or ceiling
    up = layer.codes.to(torch.float32) - floor
    unclipped = (floor >= 0) & (floor + 1 <= 7)
    assert set(up[unclipped].unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(layer.codes, rtn_codes)
    assert torch.equal(layer.weight, dequantize_affine(layer.codes, scale, zero_point))
    with torch.no_grad():
        adaround_loss = float(squared_error(layer(inputs), targets))
    assert adaround_loss < 0.85 * rtn_loss  # measured: 0.73


def test_block_reconstruction_lowers_a_basic_blocks_error_below_round_to_nearest() -> None:
    torch.manual_seed(0)
    block = BasicBlock(8, 16, stride=2).eval()  # conv1, conv2 and the 1x1 shortcut conv
    inputs = torch.relu(_correlated(128, 8, 8, seed=1))  # (N, 8, 8, 8), post-ReLU
    with torch.no_grad():
        targets = block(inputs)
        inner = torch.relu(block.gn1(block.conv1(inputs)))  # conv2's float input
    names = ("conv1", "conv2", "shortcut.0")
    quantized = to_ptq_network(block, weight_bits=dict.fromkeys(names, 2))
    layers = [layer for _, layer in ptq_layers(quantized)]
    for name, x in (("conv1", inputs), ("conv2", inner), ("shortcut.0", inputs)):
        layer = quantized.get_submodule(name)
        assert isinstance(layer, PTQLayer)
        layer.input_quantizer = ActivationQuantizer.calibrated(x, bits=4)

    def mse() -> float:
        with torch.no_grad():
            return float((quantized(inputs) - targets).square().mean())

    rtn = mse()
    history = reconstruct(
        layers,
        quantized,
        inputs=inputs,
        float_inputs=inputs,
        targets=targets,
        iterations=300,
        learn_activation_steps=True,
        keep_quantized=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(history) == 300 and all(layer.adaround is None for layer in layers)
    assert mse() < 0.8 * rtn  # measured: 0.60 (W2A4)


# MRECG ---------------------------------------------------------------------------------


def test_group_units_merges_the_largest_capacity_drops() -> None:
    # drops d = c_i - c_{i+1}: [2, 3, -1, 0]; the two largest, (1, 2) and (0, 1), chain
    assert group_units([10.0, 8.0, 5.0, 6.0, 6.0], 2) == [[0, 1, 2], [3], [4]]
    assert group_units([10.0, 8.0, 5.0, 6.0, 6.0], 1) == [[0], [1, 2], [3], [4]]
    assert group_units([10.0, 8.0, 5.0, 6.0, 6.0], 3) == [[0, 1, 2], [3, 4]]
    assert group_units([10.0, 8.0, 5.0, 6.0, 6.0], 0) == [[0], [1], [2], [3], [4]]
    assert group_units([10.0, 8.0, 5.0, 6.0, 6.0], 9) == [[0, 1, 2, 3, 4]]
    # ties go to the shallower pair: d = [2, 2, -3, 2]
    assert group_units([5.0, 3.0, 1.0, 4.0, 2.0], 1) == [[0, 1], [2], [3], [4]]
    assert group_units([5.0, 3.0, 1.0, 4.0, 2.0], 2) == [[0, 1, 2], [3], [4]]
    assert group_units([5.0, 3.0, 1.0, 4.0, 2.0], 3) == [[0, 1, 2], [3, 4]]
    assert group_units([1.0, 1.0, 1.0], 1) == [[0, 1], [2]]
    assert group_units([], 2) == [] and group_units([7.0], 2) == [[0]]
    with pytest.raises(ValueError, match="top_k"):
        group_units([1.0, 2.0], -1)
    with pytest.raises(ValueError, match="finite"):
        group_units([1.0, math.nan], 1)


def test_data_free_capacity_is_log2_of_bits_times_weights_over_downsampling() -> None:
    cnn = quantize_model(
        build_model(ModelName.CNN, seed=0),
        PTQSettings(method=PTQMethod.RTN, weight_bits=4, act_bits=32),
        calibration=None,
    )
    network = _network(cnn)
    units = reconstruction_units(ModelName.CNN)
    # conv1 and fc2 at 8 bits (first and last), conv2 and fc1 at 4
    expected = [8 * 400, 4 * 16 * 32 * 25, 4 * 1568 * 64, 8 * 640]
    assert data_free_capacities(units, network) == [math.log2(v) for v in expected]
    resnet = quantize_model(
        build_model(ModelName.RESNET, seed=0),
        PTQSettings(method=PTQMethod.RTN, weight_bits=4, act_bits=32),
        calibration=None,
    )
    # layer2: conv1 (stride 2) 16*32*9 / 4, conv2 32*32*9, shortcut (stride 2) 16*32 / 4
    units = reconstruction_units(ModelName.RESNET)
    layer2 = data_free_capacities(units, _network(resnet))[2]
    assert layer2 == math.log2(4 * (16 * 32 * 9 / 4 + 32 * 32 * 9 + 16 * 32 / 4))


def test_data_dependent_capacity_falls_as_the_relative_error_grows() -> None:
    target = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    small, large = (data_dependent_capacity(target + a * noise, target) for a in (0.01, 0.1))
    assert small > large
    assert math.isclose(small - large, math.log(100.0), rel_tol=1e-5)  # 10x noise, 100x MSE
    # scale-free: the same relative error at 10x the output scale has the same capacity
    assert math.isclose(
        data_dependent_capacity(10 * (target + 0.1 * noise), 10 * target), large, rel_tol=1e-5
    )


# The pipeline ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ModelName))
def test_units_compose_to_the_models_forward(name: ModelName) -> None:
    model = build_model(name, seed=0).eval()
    images = _images(4)
    with torch.no_grad():
        assert torch.equal(run_units(reconstruction_units(name), model, images), model(images))


def test_the_no_data_path_never_touches_the_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("the no-data path read the data set")

    for loader in ("load_mnist", "load_codes", "load_partition", "_read_source"):
        monkeypatch.setattr(fedquant.data, loader, no_data)
    settings = PTQSettings(method=PTQMethod.RTN, calibration=Calibration.NONE, act_bits=32)
    result = quantize_model(build_model(ModelName.RESNET, seed=0), settings, calibration=None)
    assert result.unit_losses == [] and result.capacities == []
    assert all(layer.input_quantizer is None for _, layer in ptq_layers(result.model))
    with torch.no_grad():
        assert bool(torch.isfinite(result.model(_images(2))).all())
    with pytest.raises(AssertionError, match="no-data path"):
        fedquant.data.load_mnist()  # the patch is in force


@pytest.mark.parametrize("method", [PTQMethod.ADAROUND, PTQMethod.BRECQ, PTQMethod.MRECG])
def test_a_reconstruction_method_refuses_to_run_without_calibration_data(
    method: PTQMethod,
) -> None:
    model = build_model(ModelName.CNN, seed=0)
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(model, PTQSettings(method=method), calibration=None)


def test_quantize_model_refuses_method_none_and_activation_bits_without_data() -> None:
    model = build_model(ModelName.CNN, seed=0)
    with pytest.raises(ValueError, match="NONE"):
        quantize_model(model, PTQSettings(method=PTQMethod.NONE), calibration=_images(8))
    with pytest.raises(ValueError, match="act-bits"):
        quantize_model(model, PTQSettings(method=PTQMethod.RTN, act_bits=8), calibration=None)
    with pytest.raises(ValueError, match="shape"):
        quantize_model(model, PTQSettings(method=PTQMethod.RTN), calibration=torch.zeros(8, 28, 28))


def test_first_and_last_layers_and_their_inputs_stay_at_8_bits() -> None:
    settings = PTQSettings(method=PTQMethod.RTN, weight_bits=2, act_bits=4)
    result = quantize_model(build_model(ModelName.CNN, seed=0), settings, calibration=_images(16))
    bits = {
        name: (layer.weight_bits, layer.input_quantizer.bits if layer.input_quantizer else None)
        for name, layer in ptq_layers(_network(result))
    }
    assert bits == {"conv1": (8, 8), "conv2": (2, 4), "fc1": (2, 4), "fc2": (8, 8)}


@pytest.mark.parametrize(
    ("method", "capacity", "qdrop"),
    [
        (PTQMethod.RTN, Capacity.DATA_FREE, 1.0),
        (PTQMethod.ADAROUND, Capacity.DATA_FREE, 1.0),
        (PTQMethod.BRECQ, Capacity.DATA_FREE, 0.5),
        (PTQMethod.MRECG, Capacity.DATA_FREE, 1.0),
        (PTQMethod.MRECG, Capacity.DATA_DEPENDENT, 0.5),
    ],
)
def test_every_method_quantizes_the_resnet_to_finite_logits(
    method: PTQMethod, capacity: Capacity, qdrop: float
) -> None:
    model = build_model(ModelName.RESNET, seed=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = PTQSettings(
        method=method, weight_bits=3, act_bits=4, iterations=4, capacity=capacity, qdrop=qdrop
    )
    images = _images(24)
    result = quantize_model(model, settings, calibration=images)
    with torch.no_grad():
        logits = result.model(images)
    assert logits.shape == (24, 10) and bool(torch.isfinite(logits).all())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    assert isinstance(result.model, PTQModel) and not result.model.training
    assert len(result.unit_losses) == len(result.unit_names)
    assert all(math.isfinite(loss) and loss >= 0 for loss in result.unit_losses)
    assert [i for group in result.groups for i in group] == list(range(len(result.unit_names)))
    expected_units = 10 if method is PTQMethod.ADAROUND else 5
    assert len(result.unit_names) == expected_units
    if method is PTQMethod.MRECG:
        assert len(result.capacities) == 5 and len(result.groups) == 5 - settings.top_k
    else:
        assert result.capacities == [] and all(len(group) == 1 for group in result.groups)
    again = quantize_model(model, settings, calibration=images)  # the seed fixes every draw
    with torch.no_grad():
        assert torch.equal(again.model(images), logits)


# Export --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ModelName))
def test_a_saved_model_loads_with_bit_identical_outputs(name: ModelName, tmp_path: Path) -> None:
    settings = PTQSettings(method=PTQMethod.BRECQ, weight_bits=4, act_bits=8, iterations=3)
    images = _images(16)
    result = quantize_model(build_model(name, seed=0), settings, calibration=images)
    path = tmp_path / "model.ptq"
    written = save_quantized(result, path)
    assert written == path.stat().st_size == result.packed_bytes
    loaded = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(loaded(images), result.model(images))
    if name is ModelName.CNN:  # 4-bit weights (8-bit first/last) and their grids
        assert result.packed_bytes < result.fp_bytes / 6
    assert b"pickle" not in path.read_bytes()[:8] and path.read_bytes()[:5] == b"FQPTQ"


def test_a_malformed_file_raises_a_typed_error(tmp_path: Path) -> None:
    settings = PTQSettings(method=PTQMethod.RTN, act_bits=32, calibration=Calibration.NONE)
    result = quantize_model(build_model(ModelName.CNN, seed=0), settings, calibration=None)
    path = tmp_path / "model.ptq"
    save_quantized(result, path)
    data = path.read_bytes()
    (length,) = struct.unpack_from("<I", data, 8)
    header, payload = json.loads(data[12 : 12 + length]), data[12 + length :]

    def rewritten(change: Callable[[dict[str, Any]], object]) -> bytes:
        edited = copy.deepcopy(header)
        change(edited)
        text = json.dumps(edited).encode()
        return data[:8] + struct.pack("<I", len(text)) + text + payload

    cases = {
        "magic": b"XXXXXXXX" + data[8:],
        "truncated": data[:-10],
        "not json": data[:12] + b"?" + data[13:],
        "other model": rewritten(lambda h: h.update(model="resnet")),
        "unknown model": rewritten(lambda h: h.update(model="vgg")),
        "bits": rewritten(lambda h: h["layers"][1].update(weight_bits=9)),
        "blob size": rewritten(lambda h: h["layers"][1].update(scale=[0, 4])),
        "out of bounds": rewritten(lambda h: h["layers"][2]["codes"].__setitem__(0, 10**9)),
        "missing layer": rewritten(lambda h: h["layers"].pop()),
    }
    assert torch.equal(  # the rewriting itself keeps a valid file valid
        load_quantized_bytes(rewritten(lambda h: None), tmp_path)(_images(2)),
        result.model(_images(2)),
    )
    for what, bad in cases.items():
        with pytest.raises(PTQFileError):
            load_quantized_bytes(bad, tmp_path)
            pytest.fail(f"{what}: loaded")


@functools.cache
def _cnn_file() -> bytes:
    settings = PTQSettings(method=PTQMethod.RTN, weight_bits=3, act_bits=4)
    result = quantize_model(build_model(ModelName.CNN, seed=0), settings, calibration=_images(8))
    return encode_quantized(result.model)


@settings(max_examples=150, deadline=None)
@given(
    cut=st.integers(min_value=0, max_value=2000),
    flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 255)), max_size=4),
)
def test_any_corrupted_file_decodes_or_raises_the_typed_error(
    cut: int, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(_cnn_file())
    for position, mask in flips:  # flips land in the magic, the length and the header
        data[position % len(data)] ^= mask
    data = data[: len(data) - cut]
    try:
        model = decode_quantized(bytes(data))
    except PTQFileError:
        return
    with torch.no_grad():
        assert model(_images(2)).shape == (2, 10)


def load_quantized_bytes(data: bytes, tmp_path: Path) -> nn.Module:
    path = tmp_path / "edited.ptq"
    path.write_bytes(data)
    return load_quantized(path)


# Accuracy ------------------------------------------------------------------------------


def test_w8a8_keeps_a_trained_cnn_within_0_3_points_of_full_precision(
    trained_cnn: nn.Module,
) -> None:
    mnist = fedquant.data.load_mnist()
    settings = PTQSettings(method=PTQMethod.RTN, weight_bits=8, act_bits=8)
    result = quantize_model(trained_cnn, settings, calibration=mnist.val.images)
    _, float_accuracy = evaluate(trained_cnn, mnist.test)
    _, quantized_accuracy = evaluate(result.model, mnist.test)
    assert float_accuracy > 0.97
    assert abs(quantized_accuracy - float_accuracy) <= 0.003
