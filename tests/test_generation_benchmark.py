"""benchmarks/generation.py: every ablation differs from the default run it is compared with."""

import pytest

from benchmarks.generation import ABLATIONS, AblationError, ablation, ablation_config, unchanged_settings
from brainvq.config import load_config


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_changes_a_default_setting(name):
    config = load_config(None)
    prior_overrides, sample_overrides, meaning = ABLATIONS[name]
    assert meaning
    assert prior_overrides or sample_overrides
    assert not unchanged_settings(config["pixelcnn"], prior_overrides)
    assert not unchanged_settings(config["sample"], sample_overrides)


def test_an_ablation_that_changes_nothing_is_refused_before_training():
    config = load_config(None)
    same = {"dropout": config["pixelcnn"]["dropout"]}
    with pytest.raises(AblationError, match="dropout"):
        ablation(None, None, None, config, same, {}, steps=1)


@pytest.mark.parametrize(("name", "steps", "expected"), [("half_steps", None, 750), ("half_steps", 150, 75),
                                                          ("third_steps", None, 500), ("third_steps", 300, 100),
                                                          ("undilated", 150, 150), ("undilated", None, 1500)])
def test_step_ablations_scale_the_step_count_they_would_otherwise_train(name, steps, expected):
    base = {**load_config(None)["pixelcnn"], "steps": 1500}
    assert ablation_config(base, ABLATIONS[name][0], steps)["steps"] == expected
