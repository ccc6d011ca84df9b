"""FusionNet: output shapes per strategy, masking of absent modalities, modality dropout only in training."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from riskbridge.model.network import STRATEGIES, FusionNet, ModelConfig, modality_dropout
from riskbridge.model.preprocess import PreprocessConfig

SIZE = (16, 12, 8)
LABS = ("wbc", "crp", "age_years")
NOTES = ("diabetes", "copd")


def config(strategy: Any = "hybrid", dropout: float = 0.25) -> ModelConfig:
    return ModelConfig(
        name="test",
        version="0",
        strategy=strategy,
        feature_spec="chest_ct@1",
        lab_features=LABS,
        note_features=NOTES,
        preprocess=PreprocessConfig(spacing_mm=(8.0, 8.0, 8.0), size=SIZE, hu_window=(-1000.0, 400.0)),
        embed_dim=8,
        hidden_dim=16,
        image_channels=(4, 4, 8, 8),
        modality_dropout=dropout,
        lab_center=(7.0, 1.0, 65.0),
        lab_scale=(2.0, 1.0, 10.0),
        lab_log=(False, True, False),
    )


def batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand((n, 1, *SIZE), generator=generator)
    labs = torch.cat([torch.rand((n, 3), generator=generator) * 10 + 0.5, torch.ones((n, 3))], dim=1)
    notes = torch.cat([(torch.rand((n, 2), generator=generator) < 0.5).float(), torch.ones((n, 2))], dim=1)
    present = torch.ones((n, 3), dtype=torch.bool)
    return image, labs, notes, present


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_gives_one_logit_per_row_and_attention_over_three_modalities(strategy: str) -> None:
    torch.manual_seed(0)
    net = FusionNet(config(strategy)).eval()
    image, labs, notes, present = batch()
    out = net(image, labs, notes, present)
    assert out.logits.shape == (4,)
    assert out.attention.shape == (4, 3)
    assert torch.allclose(out.attention.sum(dim=1), torch.ones(4))
    assert torch.isfinite(out.logits).all()
    unused = ~torch.tensor(net.config.uses)
    assert (out.attention[:, unused] == 0).all()
    assert (out.unimodal_logits is not None) == (strategy == "late")


@pytest.mark.parametrize("strategy", ["hybrid", "late", "early"])
def test_a_missing_modality_gets_zero_attention_and_its_input_is_never_read(strategy: str) -> None:
    torch.manual_seed(0)
    net = FusionNet(config(strategy)).eval()
    image, labs, notes, present = batch()
    present[0, 0] = False  # no image
    present[1, 1] = False  # no labs
    present[2, 2] = False  # no notes
    out = net(image, labs, notes, present)
    assert out.attention[0, 0] == 0 and out.attention[1, 1] == 0 and out.attention[2, 2] == 0
    assert (out.attention[3] > 0).all()
    # garbage in the absent modalities' inputs changes nothing
    image2, labs2, notes2 = image.clone(), labs.clone(), notes.clone()
    image2[0] = 1e6
    labs2[1, :3] = 1e6
    notes2[2, :2] = -5.0
    out2 = net(image2, labs2, notes2, present)
    assert torch.allclose(out.logits, out2.logits, atol=1e-5)
    assert torch.allclose(out.attention, out2.attention)


def test_hybrid_attention_is_a_softmax_over_present_modalities_only() -> None:
    torch.manual_seed(0)
    net = FusionNet(config("hybrid")).eval()
    image, labs, notes, present = batch()
    present[:, 0] = False
    out = net(None, labs, notes, present)
    assert (out.attention[:, 0] == 0).all()
    assert torch.allclose(out.attention[:, 1:].sum(dim=1), torch.ones(4))
    # the same rows with an image present: attention now spreads over three modalities
    present_all = torch.ones_like(present)
    assert (net(image, labs, notes, present_all).attention[:, 0] > 0).all()


def test_a_row_without_any_modality_or_an_image_claimed_but_not_given_is_an_error() -> None:
    net = FusionNet(config("hybrid")).eval()
    image, labs, notes, present = batch()
    present[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        net(image, labs, notes, present)
    with pytest.raises(ValueError, match="no image tensor"):
        net(None, labs, notes, torch.ones((4, 3), dtype=torch.bool))
    tabular = FusionNet(config("tabular")).eval()
    only_image = torch.tensor([[True, False, False]] * 4)
    with pytest.raises(ValueError, match="none of the modalities"):
        tabular(image, labs, notes, only_image)


def test_modality_dropout_acts_only_in_training_mode() -> None:
    torch.manual_seed(0)
    net = FusionNet(config("hybrid", dropout=0.5))
    image, labs, notes, present = batch(n=16)
    net.eval()
    first = net(image, labs, notes, present)
    second = net(image, labs, notes, present)
    assert torch.equal(first.logits, second.logits)
    assert (first.attention > 0).all()  # nothing dropped at inference
    net.train()
    torch.manual_seed(1)
    trained = net(image, labs, notes, present)
    dropped = trained.attention == 0
    assert dropped.any()  # with p = 0.5 over 48 modality slots, some are dropped
    assert (~dropped).any(dim=1).all()  # never all of a row's modalities
    assert torch.allclose(trained.attention.sum(dim=1), torch.ones(16))


def test_modality_dropout_never_removes_every_present_modality() -> None:
    generator = torch.Generator().manual_seed(3)
    present = torch.tensor([[True, True, True], [True, False, False], [False, True, True]] * 200)
    kept = modality_dropout(present, 0.9, generator)
    assert kept.any(dim=1).all()
    assert not (kept & ~present).any()  # never adds a modality
    assert kept.sum() < present.sum()
    assert torch.equal(modality_dropout(present, 0.0), present)


def test_labs_are_standardized_inside_the_network_from_the_config() -> None:
    net = FusionNet(config("tabular"))
    labs = torch.tensor([[9.0, float(torch.e), 75.0, 1.0, 1.0, 0.0]])
    standardized = net.standardize_labs(labs)
    assert torch.allclose(standardized, torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0, 0.0]]), atol=1e-5)


def test_config_round_trips_through_json_form_and_rejects_unknown_keys() -> None:
    original = config("late")
    assert ModelConfig.from_dict(original.to_dict()) == original
    data = original.to_dict()
    data["surprise"] = 1
    with pytest.raises(ValueError, match="surprise"):
        ModelConfig.from_dict(data)
    with pytest.raises(ValueError, match="strategy"):
        config("stacked")


def test_burden_features_count_nodules_and_their_diameters() -> None:
    from riskbridge.model.network import burden_features

    logits = torch.full((2, 1, 16, 16, 8), -10.0)
    logits[0, 0, 2:4, 2:4, 2:4] = 10.0  # 8 voxels of 8 mm³ = 64 mm³: a 4.96 mm sphere
    logits[0, 0, 10, 10, 5] = 10.0  # one voxel: a 2.48 mm sphere
    features = burden_features(logits, (2.0, 2.0, 2.0), 0.5)
    burden, count, _, largest, peak = features[0].tolist()
    diameters = [(6 * 64 / torch.pi) ** (1 / 3), (6 * 8 / torch.pi) ** (1 / 3)]
    assert count == pytest.approx(torch.log1p(torch.tensor(2.0)).item())
    assert burden == pytest.approx(torch.log1p(torch.tensor(sum(diameters) / 5)).item(), rel=1e-5)
    assert largest == pytest.approx(diameters[0] / 10, rel=1e-5) and peak == pytest.approx(1.0, abs=1e-4)
    assert features[1, :2].tolist() == [0.0, 0.0] and features[1, 3] == 0.0  # nothing found: no nodule


def test_the_detector_encoder_embeds_its_burden_and_is_saved_with_the_config() -> None:
    detector = ModelConfig.from_dict({**config().to_dict(), "image_encoder": "detector", "detector_channels": [4, 8]})
    network = FusionNet(detector).eval()
    image, labs, notes, present = batch()
    output = network(image, labs, notes, present)
    assert output.logits.shape == (4,) and torch.isfinite(output.logits).all()
    assert ModelConfig.from_dict(detector.to_dict()) == detector
    with pytest.raises(ValueError, match="divisible by 4"):
        ModelConfig.from_dict(
            {
                **detector.to_dict(),
                "detector_channels": [4, 8, 16],
                "preprocess": {"spacing_mm": [8.0, 8.0, 8.0], "size": [16, 12, 6], "hu_window": [-1000.0, 400.0]},
            }
        )
    with pytest.raises(ValueError, match="image_encoder must be one of"):
        ModelConfig.from_dict({**detector.to_dict(), "image_encoder": "vit"})
