"""The slice autoencoder and its bottlenecks (brainvq.models), on tiny tensors made here."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch

from brainvq.config import load_config
from brainvq.models import (
    VQVAE,
    CodeUsage,
    FiniteScalarQuantizer,
    GaussianBottleneck,
    IdentityBottleneck,
    ModelConfigError,
    ModelInputError,
    NotDiscreteError,
    SpatialDimsError,
    VectorQuantizer,
    build_vqvae,
)

torch.set_num_threads(1)


def tiny_section(**overrides) -> dict:
    settings = {"channels": [4, 8], "latent_dim": 4, "codebook_size": 16, "res_blocks": 1, "fsq_levels": [3, 3]}
    return load_config(overrides={"vqvae": {**settings, **overrides}})["vqvae"]


def smooth_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Blurry random blobs in [0, 1], (n, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def clustered_latents(n_clusters: int, dim: int, offset: float, seed: int) -> torch.Tensor:
    """Latents (n_clusters * 8, dim, 4, 4) drawn around n_clusters well separated centres far from the origin."""
    g = torch.Generator().manual_seed(seed)
    centres = offset + 3 * torch.randn(n_clusters, dim, generator=g)
    points = centres.repeat_interleave(128, 0) + 0.05 * torch.randn(n_clusters * 128, dim, generator=g)
    points = points[torch.randperm(len(points), generator=g)]
    return points.reshape(-1, 4, 4, dim).permute(0, 3, 1, 2).contiguous()


def codes_used_after_training(quantizer: VectorQuantizer, data: torch.Tensor, steps: int) -> int:
    quantizer.train()
    for step in range(steps):
        quantizer(data[(step % 4) * 32:(step % 4 + 1) * 32])
    quantizer.eval()
    usage = CodeUsage(quantizer.codebook_size)
    _, aux = quantizer(data)
    usage.update(aux["indices"])
    return usage.used


@pytest.mark.parametrize("bottleneck", ["vq", "fsq", "ae", "vae"])
def test_each_bottleneck_reconstructs_input_shape_and_passes_gradients_to_encoder_and_decoder(bottleneck):
    torch.manual_seed(0)
    model = build_vqvae(tiny_section(bottleneck=bottleneck))
    x = smooth_images(4)
    reconstruction, aux = model(x)
    assert reconstruction.shape == x.shape
    loss = (reconstruction - x).abs().mean() + sum(aux["loss"].values())
    loss.backward()
    for name in ("encoder", "decoder"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    if bottleneck in ("vq", "fsq"):
        assert aux["indices"].shape == (4, 4, 4) and aux["indices"].dtype == torch.long
        assert 1 <= float(aux["perplexity"]) <= model.codebook_size


@pytest.mark.parametrize("bottleneck", ["vq", "fsq"])
def test_decoding_the_encoded_indices_gives_the_eval_reconstruction(bottleneck):
    torch.manual_seed(0)
    model = build_vqvae(tiny_section(bottleneck=bottleneck))
    x = smooth_images(3)
    model.train()
    model(x)  # k-means initialisation of the vq codebook
    model.eval()
    with torch.no_grad():
        indices = model.encode_indices(x)
        decoded = model.decode_indices(indices)
        reconstruction, aux = model(x)
    assert indices.shape == (3, 4, 4) and indices.dtype == torch.long
    assert 0 <= int(indices.min()) and int(indices.max()) < model.codebook_size
    assert torch.equal(indices, aux["indices"])
    assert decoded.shape == (3, 1, 16, 16) and 0 <= float(decoded.min()) and float(decoded.max()) <= 1
    torch.testing.assert_close(decoded, reconstruction.clamp(0, 1))


@pytest.mark.parametrize("bottleneck", ["ae", "vae"])
def test_continuous_bottlenecks_refuse_to_give_codes(bottleneck):
    model = build_vqvae(tiny_section(bottleneck=bottleneck))
    with pytest.raises(NotDiscreteError, match="vq or fsq"):
        model.encode_indices(smooth_images(1))
    with pytest.raises(NotDiscreteError):
        model.decode_indices(torch.zeros(1, 4, 4, dtype=torch.long))


def test_encode_features_returns_prequantization_latents_at_code_resolution():
    model = build_vqvae(tiny_section(downsample=8, channels=[4, 4, 8], latent_dim=6))
    assert model.encode_features(smooth_images(2)).shape == (2, 6, 2, 2)


def test_channels_must_have_one_entry_per_halving_of_downsample():
    # load_config refuses this pair at start-up (tests/test_config.py); the model refuses a section built by hand.
    with pytest.raises(ModelConfigError, match="vqvae.channels.*vqvae.downsample"):
        build_vqvae({**tiny_section(), "downsample": 8, "channels": [4, 8]})


def test_image_size_not_divisible_by_downsample_is_refused_naming_the_knobs():
    model = build_vqvae(tiny_section())
    with pytest.raises(ModelInputError, match="preprocess.size.*vqvae.downsample"):
        model(torch.rand(1, 1, 18, 18))


def test_kmeans_init_and_dead_code_restart_use_most_of_a_codebook_where_plain_vq_collapses():
    data = clustered_latents(16, dim=8, offset=6.0, seed=0)
    torch.manual_seed(0)
    plain = VectorQuantizer(16, dim=8, kmeans_init=False, dead_code_steps=0, decay=0.9)
    torch.manual_seed(0)
    remedied = VectorQuantizer(16, dim=8, kmeans_init=True, dead_code_steps=3, decay=0.9)
    plain_used = codes_used_after_training(plain, data, steps=40)
    remedied_used = codes_used_after_training(remedied, data, steps=40)
    assert plain_used <= 6, plain_used
    assert remedied_used >= 13, remedied_used


def test_dead_code_restart_reseeds_codes_unused_for_dead_code_steps_from_current_latents():
    data = clustered_latents(4, dim=8, offset=0.0, seed=1)[:32]
    flat = data.permute(0, 2, 3, 1).reshape(-1, 8)
    quantizer = VectorQuantizer(8, dim=8, kmeans_init=False, dead_code_steps=2, decay=0.9)
    with torch.no_grad():
        quantizer.codebook[4:] = 1000.0  # never the nearest code
        quantizer.codebook[:4] = flat[:4]
    quantizer.train()
    _, first = quantizer(data)
    assert first["restarted"] == 0
    _, second = quantizer(data)
    assert second["restarted"] == 4
    # The re-seeded codes are latents of the current batch.
    assert bool((quantizer.codebook[4:, None] == flat[None]).all(-1).any(-1).all())
    assert bool((quantizer.steps_unused[4:] == 0).all())


def test_ema_codebook_moves_in_training_and_is_frozen_in_eval():
    data = clustered_latents(4, dim=8, offset=2.0, seed=2)[:16]
    quantizer = VectorQuantizer(8, dim=8, kmeans_init=True, dead_code_steps=1)
    quantizer.train()
    quantizer(data)
    before = {k: v.clone() for k, v in quantizer.state_dict().items()}
    quantizer(data + 0.5)
    assert not torch.equal(before["codebook"], quantizer.codebook)
    quantizer.eval()
    after_training = {k: v.clone() for k, v in quantizer.state_dict().items()}
    for _ in range(3):
        quantizer(data + 3.0)
    for key, value in quantizer.state_dict().items():
        assert torch.equal(value, after_training[key]), key


def test_vector_quantizer_state_round_trips_through_a_weights_only_checkpoint():
    data = clustered_latents(4, dim=8, offset=1.0, seed=3)[:16]
    quantizer = VectorQuantizer(8, dim=8, codebook_dim=3, l2_normalize=True, dead_code_steps=5)
    quantizer.train()
    quantizer(data)
    buffer = io.BytesIO()
    torch.save(quantizer.state_dict(), buffer)
    buffer.seek(0)
    fresh = VectorQuantizer(8, dim=8, codebook_dim=3, l2_normalize=True, dead_code_steps=5)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    quantizer.eval(), fresh.eval()
    assert torch.equal(quantizer.latents_to_indices(data), fresh.latents_to_indices(data))
    assert int(fresh.initialized) == 1


def test_factorised_l2_codes_live_on_the_unit_sphere_in_the_low_dimension():
    quantizer = VectorQuantizer(8, dim=8, codebook_dim=3, l2_normalize=True)
    quantizer.train()
    out, aux = quantizer(clustered_latents(4, dim=8, offset=1.0, seed=4)[:16])
    assert quantizer.codebook.shape == (8, 3)
    torch.testing.assert_close(quantizer.codebook.norm(dim=1), torch.ones(8))
    assert out.shape == (16, 8, 4, 4)


def test_fsq_indices_cover_the_implicit_codebook_and_round_trip():
    quantizer = FiniteScalarQuantizer(levels=(4, 3), dim=2).eval()
    with torch.no_grad():
        quantizer.project_in.weight.copy_(torch.eye(2)[:, :, None, None])
        quantizer.project_in.bias.zero_()
    grid = torch.linspace(-4, 4, 40)
    z = torch.stack(torch.meshgrid(grid, grid, indexing="ij")).reshape(1, 2, 40, 40)
    latents, aux = quantizer(z)
    assert quantizer.codebook_size == 12
    assert set(aux["indices"].unique().tolist()) == set(range(12))
    torch.testing.assert_close(quantizer.indices_to_latents(aux["indices"]), latents)
    assert torch.equal(quantizer.latents_to_indices(z), aux["indices"])


def test_vae_kl_matches_the_closed_form():
    bottleneck = GaussianBottleneck(dim=2, kl_weight=0.5)
    with torch.no_grad():
        bottleneck.to_moments.weight.zero_()
        bottleneck.to_moments.bias.copy_(torch.tensor([1.0, 1.0, 0.5, 0.5]))  # mean 1, log-variance 0.5
    _, aux = bottleneck(torch.randn(2, 2, 3, 3))
    expected = 0.5 * (1.0 + torch.exp(torch.tensor(0.5)) - 0.5 - 1.0)
    torch.testing.assert_close(aux["kl"], expected)
    torch.testing.assert_close(aux["loss"]["kl_loss"], 0.5 * expected)


def test_vae_kl_stays_bounded_when_the_log_variance_is_driven_to_extremes():
    bottleneck = GaussianBottleneck(dim=2, kl_weight=1.0, logvar_range=(-8.0, 4.0))
    with torch.no_grad():
        bottleneck.to_moments.weight.zero_()
        bottleneck.to_moments.bias.copy_(torch.tensor([0.0, 0.0, -1e4, 1e4]))
    _, aux = bottleneck(torch.randn(2, 2, 3, 3))
    low = 0.5 * (torch.exp(torch.tensor(-8.0)) + 8.0 - 1.0)
    high = 0.5 * (torch.exp(torch.tensor(4.0)) - 4.0 - 1.0)
    torch.testing.assert_close(aux["kl"], (low + high) / 2)


def test_vae_kl_levels_off_and_log_variance_stays_clamped_over_a_toy_training_run():
    # Reconstruction rewards shrinking the posterior variance; the clamp stops the log-variance and the
    # (warmed-up) KL weight stops the mean, so the KL must level off rather than keep growing.
    torch.manual_seed(0)
    model = build_vqvae(tiny_section(bottleneck="vae", kl_weight=1e-3))
    model.bottleneck.logvar_range = (-4.0, 2.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = smooth_images(8, seed=5)
    kls = []
    for step in range(240):
        reconstruction, aux = model(x)
        loss = (reconstruction - x).abs().mean() + aux["loss"]["kl_loss"] * min(1.0, step / 50)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        kls.append(float(aux["kl"]))
    with torch.no_grad():
        _, logvar = model.bottleneck.moments(model.encode_features(x))
    assert float(logvar.min()) >= -4.0
    assert all(torch.isfinite(torch.tensor(kls)))
    assert max(kls[160:]) <= 1.25 * max(kls[80:160]), (max(kls[80:160]), max(kls[160:]))


def test_vae_returns_its_mean_in_eval_mode():
    model = build_vqvae(tiny_section(bottleneck="vae")).eval()
    x = smooth_images(2)
    with torch.no_grad():
        first, _ = model(x)
        second, _ = model(x)
    assert torch.equal(first, second)


def test_code_usage_counts_distinct_codes_over_a_pass():
    usage = CodeUsage(8)
    usage.update(torch.tensor([[0, 1], [1, 1]]))
    usage.update(torch.tensor([5]))
    assert usage.used == 3 and usage.fraction_used == 3 / 8
    assert usage.counts.tolist() == [1, 3, 0, 0, 0, 1, 0, 0]
    usage.reset()
    assert usage.used == 0


def test_default_model_has_typed_documented_defaults():
    model = VQVAE()
    assert model.downsample == 8 and model.codebook_size == 512 and model.is_discrete


# ------------------------------------------------------------------------------ 2D and 3D, one definition


def smooth_volumes(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Blurry random blobs in [0, 1], (n, 1, size, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, size // 4, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)


def layer_kinds(model: torch.nn.Module) -> list[str]:
    """The model's module types in order, with the dimensionality taken out of the names."""
    return [type(m).__name__.replace("2d", "Nd").replace("3d", "Nd") for m in model.modules()]


@pytest.mark.parametrize("bottleneck", ["vq", "fsq", "som", "ae", "vae"])
def test_slice_and_volume_models_come_from_the_same_classes_and_both_train(bottleneck):
    section = tiny_section(bottleneck=bottleneck)
    models = {dims: build_vqvae(section, spatial_dims=dims) for dims in (2, 3)}
    assert type(models[2]) is type(models[3]) and type(models[2].bottleneck) is type(models[3].bottleneck)
    assert layer_kinds(models[2]) == layer_kinds(models[3])
    assert models[2].state_dict().keys() == models[3].state_dict().keys()
    assert any(isinstance(m, torch.nn.Conv3d) for m in models[3].modules())
    assert not any(isinstance(m, torch.nn.Conv3d) for m in models[2].modules())
    for dims, x in ((2, smooth_images(2, size=8)), (3, smooth_volumes(2))):
        model = models[dims].train()
        reconstruction, aux = model(x)
        assert reconstruction.shape == x.shape
        (reconstruction - x).abs().mean().add(sum(aux["loss"].values())).backward()
        for part in (model.encoder, model.decoder):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), (dims, part)
        if model.is_discrete:
            assert aux["indices"].shape == (2,) + (2,) * dims  # 8 / downsample 4 along every axis
            model.eval()
            with torch.no_grad():
                indices = model.encode_indices(x)
                torch.testing.assert_close(model.decode_indices(indices), model(x)[0].clamp(0, 1))
            assert indices.shape == (2,) + (2,) * dims and indices.dtype == torch.long


def test_volume_model_encodes_features_and_codes_at_the_downsampled_grid():
    model = build_vqvae(tiny_section(downsample=8, channels=[4, 4, 8], latent_dim=6), spatial_dims=3)
    x = torch.rand(1, 1, 16, 8, 24)
    assert model.encode_features(x).shape == (1, 6, 2, 1, 3)
    assert model.encode_indices(x).shape == (1, 2, 1, 3)


def test_volume_model_refuses_slices_and_sizes_not_divisible_naming_the_knobs():
    model = build_vqvae(tiny_section(), spatial_dims=3)
    with pytest.raises(ModelInputError, match=r"volumes \(B, 1, D, H, W\)"):
        model(smooth_images(1))
    with pytest.raises(ModelInputError, match="preprocess.size.*vqvae.downsample"):
        model(torch.rand(1, 1, 8, 8, 10))


def test_spatial_dims_other_than_2_or_3_and_mixed_dimensionalities_are_refused():
    with pytest.raises(SpatialDimsError, match="spatial_dims=1"):
        build_vqvae(tiny_section(), spatial_dims=1)
    with pytest.raises(ModelConfigError, match="same spatial_dims"):
        VQVAE(VectorQuantizer(16, 4, spatial_dims=3), channels=(4, 8), latent_dim=4, spatial_dims=2)


def state_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# Computed with the 2D-only code of main (commit 0b65f20) on the same constructions: the same weights
# and the same draw from the RNG afterwards (so parameters are created in the same order).
SLICE_MODEL_FINGERPRINTS = {
    "vq": ("01b5ca2cdeb0bdb8", 1967720869),
    "fsq": ("f1a2df2dae5a4d06", 1553021359),
    "ae": ("6d73f3bcd571a5e1", 1236588731),
    "vae": ("3d62876f4904afe0", 1482425508),
}


@pytest.mark.parametrize("bottleneck", sorted(SLICE_MODEL_FINGERPRINTS))
def test_slice_models_have_exactly_the_weights_of_the_2d_only_code(bottleneck):
    make = {
        "vq": lambda: VectorQuantizer(16, dim=6, codebook_dim=3),
        "fsq": lambda: FiniteScalarQuantizer((3, 3), dim=6),
        "ae": lambda: IdentityBottleneck(),
        "vae": lambda: GaussianBottleneck(dim=6),
    }[bottleneck]
    torch.manual_seed(0)
    model = VQVAE(make(), channels=(4, 8), res_blocks=1, latent_dim=6)
    assert (state_fingerprint(model), int(torch.randint(2**31, (1,)))) == SLICE_MODEL_FINGERPRINTS[bottleneck]


# ---------------------------------------------------------------- reconstruction of the encoder output


def test_gamma_e_adds_the_weighted_reconstruction_of_the_encoder_output_in_training_only():
    torch.manual_seed(0)
    model = build_vqvae(tiny_section(gamma_q=0.2, gamma_e=0.8)).train()
    x = smooth_images(3)
    reconstruction, aux = model(x)
    with torch.no_grad():
        expected_e = model.decoder(model.encode_features(x))
    torch.testing.assert_close(aux["reconstruction_e"], expected_e)
    terms = model.reconstruction_losses(reconstruction, x, aux, torch.nn.functional.l1_loss)
    assert terms.keys() == {"recon_loss", "recon_loss_e"}
    torch.testing.assert_close(terms["recon_loss"], 0.2 * (reconstruction - x).abs().mean())
    torch.testing.assert_close(terms["recon_loss_e"], 0.8 * (expected_e - x).abs().mean())
    model.eval()
    with torch.no_grad():
        assert "reconstruction_e" not in model(x)[1]


def test_default_gammas_leave_the_loss_the_plain_reconstruction():
    torch.manual_seed(0)
    model = build_vqvae(tiny_section()).train()
    assert (model.gamma_q, model.gamma_e) == (1.0, 0.0)
    x = smooth_images(2)
    reconstruction, aux = model(x)
    assert "reconstruction_e" not in aux
    terms = model.reconstruction_losses(reconstruction, x, aux, torch.nn.functional.l1_loss)
    assert list(terms) == ["recon_loss"]
    assert torch.equal(terms["recon_loss"], torch.nn.functional.l1_loss(reconstruction, x))


def test_gamma_e_gives_the_encoder_a_reconstruction_gradient_when_the_codes_pass_none():
    # The reference SOM-VAE (no straight-through): D(z_q) trains the decoder and the map, not the encoder.
    torch.manual_seed(0)
    model = build_vqvae(tiny_section(bottleneck="som", som_straight_through=False, gamma_e=0.5)).train()
    x = smooth_images(2)
    reconstruction, aux = model(x)
    terms = model.reconstruction_losses(reconstruction, x, aux, torch.nn.functional.l1_loss)
    encoder = list(model.encoder.parameters())
    from_q = torch.autograd.grad(terms["recon_loss"], encoder, retain_graph=True, allow_unused=True)
    from_e = torch.autograd.grad(terms["recon_loss_e"], encoder, allow_unused=True)
    assert all(g is None for g in from_q)
    assert any(g is not None and g.abs().sum() > 0 for g in from_e)


def test_negative_gammas_are_refused_naming_the_keys():
    with pytest.raises(ModelConfigError, match="vqvae.gamma_q"):
        VQVAE(gamma_e=-1.0)


def test_models_saved_before_the_gamma_keys_existed_still_build():
    section = {k: v for k, v in tiny_section().items() if k not in ("gamma_q", "gamma_e")}
    assert build_vqvae(section).gamma_e == 0.0
