"""The gated PixelCNN is causal in raster order, has no blind spot, and its fast sampling path agrees with it."""

from __future__ import annotations

import math

import pytest
import torch

from brainvq.models.pixelcnn import GatedPixelCNN

torch.set_num_threads(1)

H, W, K = 7, 9, 12


def tiny_model(**overrides) -> GatedPixelCNN:
    """A 3-layer model with random (not zero-initialised) weights, so every real path carries gradient."""
    torch.manual_seed(0)
    kwargs = dict(codebook_size=K, channels=8, layers=3, kernel_size=3, cond_channels=4, n_labels=3,
                  map_size=(H, W), head_channels=8)
    kwargs.update(overrides)
    model = GatedPixelCNN(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def input_dependence(model: GatedPixelCNN, i: int, j: int) -> torch.Tensor:
    """Return an (H, W) bool map: which embedded input positions the logits at (i, j) have gradient w.r.t."""
    codes = torch.randint(0, K, (1, H, W), generator=torch.Generator().manual_seed(1))
    position = torch.tensor([0.3])
    cond = model.condition(position, torch.tensor([1]))
    embedded = model.embed(codes, model.location_map(position)).detach().requires_grad_(True)
    logits = model.logits_from_embedding(embedded, cond)
    (grad,) = torch.autograd.grad(logits[0, :, i, j].sum(), embedded)
    return grad[0].abs().sum(0) > 0


@pytest.mark.parametrize("i, j", [(0, 0), (0, 4), (0, W - 1), (3, 0), (3, 4), (3, W - 1), (H - 1, W - 1)])
def test_logits_have_zero_gradient_wrt_current_and_later_codes(i, j):
    depends = input_dependence(tiny_model(), i, j).flatten()
    assert not depends[i * W + j :].any()


@pytest.mark.parametrize("i, j", [(0, 4), (0, W - 1), (3, 0), (3, 4), (3, W - 1), (H - 1, W - 1)])
def test_logits_depend_on_the_code_above_and_the_code_to_the_left(i, j):
    depends = input_dependence(tiny_model(), i, j)
    if i > 0:
        assert depends[i - 1, j]
    if j > 0:
        assert depends[i, j - 1]


def test_receptive_field_reaches_above_right_where_a_masked_pixelcnn_is_blind():
    # A single masked stack misses (i-1, j+1) and (i-2, j+2); the vertical stack sees a full-width band.
    depends = input_dependence(tiny_model(), 4, 4)
    assert depends[3, 5] and depends[2, 6] and depends[3, 7]
    assert depends[3, 1] and depends[4, 0]


def test_raster_logits_equal_full_forward_logits():
    model = tiny_model(kernel_size=5, layers=2)
    codes = torch.randint(0, K, (2, H, W), generator=torch.Generator().manual_seed(2))
    positions, labels = torch.tensor([0.1, 0.9]), torch.tensor([0, 2])
    with torch.no_grad():
        full = model(codes, positions, labels)
        steps = list(model.raster_logits(codes.clone(), model.condition(positions, labels), positions))
    assert [(i, j) for i, j, _ in steps] == [(i, j) for i in range(H) for j in range(W)]
    for i, j, logits in steps:
        torch.testing.assert_close(logits, full[:, :, i, j], atol=1e-5, rtol=1e-4)


def test_slice_position_and_label_change_the_logits():
    model = tiny_model()
    codes = torch.zeros(1, H, W, dtype=torch.long)
    with torch.no_grad():
        base = model(codes, torch.tensor([0.2]), torch.tensor([0]))
        moved = model(codes, torch.tensor([0.8]), torch.tensor([0]))
        relabelled = model(codes, torch.tensor([0.2]), torch.tensor([1]))
    assert not torch.allclose(base, moved)
    assert not torch.allclose(base, relabelled)


def test_label_conditioned_model_refuses_missing_label():
    with pytest.raises(ValueError, match="label"):
        tiny_model()(torch.zeros(1, H, W, dtype=torch.long), torch.tensor([0.5]))


def test_model_refuses_maps_of_another_size():
    with pytest.raises(ValueError, match="built for"):
        tiny_model()(torch.zeros(1, H + 1, W, dtype=torch.long), torch.tensor([0.5]), torch.tensor([0]))


def test_even_kernel_size_is_rejected():
    with pytest.raises(ValueError, match="odd"):
        GatedPixelCNN(codebook_size=K, kernel_size=4)


def test_dilated_layers_stay_causal_and_cover_the_whole_map():
    # Kernel 5 with dilations 1, 2, 4 reaches 14 rows and columns in three layers, where undilated ones reach 6.
    model = tiny_model(kernel_size=5, dilations=(1, 2, 4))
    assert model.reach == 14
    for i, j in ((0, 4), (3, 4), (H - 1, W - 1)):
        assert not input_dependence(model, i, j).flatten()[i * W + j :].any()
    corner = input_dependence(model, H - 1, W - 1)
    assert corner[0, 0] and corner[0, W - 1] and corner[H - 1, 0]
    assert not input_dependence(tiny_model(kernel_size=5), H - 1, W - 1)[0, 0]


def test_raster_logits_of_a_dilated_model_equal_full_forward_logits():
    model = tiny_model(kernel_size=5, layers=3, dilations=(1, 3), position_anchors=3)
    codes = torch.randint(0, K, (2, H, W), generator=torch.Generator().manual_seed(3))
    positions, labels = torch.tensor([0.2, 0.7]), torch.tensor([1, 0])
    with torch.no_grad():
        full = model(codes, positions, labels)
        for i, j, logits in model.raster_logits(codes.clone(), model.condition(positions, labels), positions):
            torch.testing.assert_close(logits, full[:, :, i, j], atol=1e-5, rtol=1e-4)


def test_code_bits_average_to_the_cross_entropy_of_the_logits():
    model = tiny_model()
    codes = torch.randint(0, K, (2, H, W), generator=torch.Generator().manual_seed(4))
    positions, labels = torch.tensor([0.2, 0.7]), torch.tensor([1, 0])
    with torch.no_grad():
        bits = model.code_bits(codes, positions, labels)
        expected = torch.nn.functional.cross_entropy(model(codes, positions, labels), codes) / math.log(2)
    assert bits.shape == (2, H, W)
    torch.testing.assert_close(bits.mean(), expected)


def test_nucleus_keeps_the_fewest_likely_codes_holding_top_p_and_renormalises():
    from brainvq.models.pixelcnn import nucleus

    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.97, 0.01, 0.01, 0.01]])
    cut = nucleus(probs, 0.75)
    torch.testing.assert_close(cut, torch.tensor([[0.625, 0.0, 0.375, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert nucleus(probs, 1.0) is probs


def test_location_bias_follows_the_slice_position_between_anchors():
    model = tiny_model(position_anchors=3)
    maps = model.location_map(torch.tensor([0.0, 0.5, 0.25, 1.0]))
    anchors = model.location_bias
    torch.testing.assert_close(maps[0], anchors[0])
    torch.testing.assert_close(maps[1], anchors[1])
    torch.testing.assert_close(maps[2], (anchors[0] + anchors[1]) / 2)
    torch.testing.assert_close(maps[3], anchors[2])
    single = tiny_model()
    torch.testing.assert_close(single.location_map(torch.tensor([0.1, 0.9]))[1], single.location_bias[0])
