"""The generation judge: what ``evaluate`` measures on a set of generated slices, fitted once per run.

:func:`fit_judge` trains what does not depend on the samples (the position regressor on training slices, the copy
thresholds on known copies of training maps); :func:`judge_samples` then measures any set of generated slices
with their code maps and slice positions: the prior's samples, the controls (``evaluate``) and each ablation
(``benchmarks/generation.py``). The measures are in ``brainvq.measures`` (two_sample, position, copies,
distributions); their docstrings say what each can and cannot detect.

Real slices are matched to the generated ones by axial position (``match_position_window``): the real test slices
themselves, and their *reconstructions* (decoded test code maps: the same decoder as the samples, so a
difference between samples and reconstructions is the prior's alone).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from brainvq.measures.copies import (
    calibrated_thresholds,
    copies_summary,
    copy_flags,
    highest_decoded_ssim,
    nearest_code_maps,
    perturbed_copies,
)
from brainvq.measures.distributions import SampleSizeError, frechet_distance, matched_real_indices, precision_recall
from brainvq.measures.position import chance_mae, fit_position_regressor, position_mae
from brainvq.measures.slice_networks import SliceCNN, network_outputs
from brainvq.measures.two_sample import classifier_two_sample_test

log = logging.getLogger(__name__)

C2ST_PAIRS = ("samples_vs_reconstructions", "samples_vs_real", "reconstructions_vs_real")
# Stand-ins for samples that must score well or badly (control_code_maps says which is which).
CONTROLS = ("training_maps", "shuffled_maps", "uniform_codes", "copies_mixed")
FEATURES_LABEL = "position-regressor features (a CNN trained on training slices only; not the judged VQ-VAE)"


@dataclass
class GenerationJudge:
    """What measuring generated slices needs, fitted once per run.

    Attributes:
        settings: the ``evaluate`` config section.
        codebook_size: K.
        decode: code maps ``(N, h, w)`` -> images ``(N, H, W)`` in [0, 1] (the run's VQ-VAE decoder).
        train_codes, train_positions: every training code map and its slice position (copy candidates).
        test_codes, test_positions: the code map and slice position of each real test slice, in ``test_images`` order.
        test_subjects: the subject of each real test slice (the two-sample test holds out whole subjects).
        test_images: rows of the test slices -> their images ``(N, H, W)``.
        train_images: slice positions -> training slices matched to them (the real-vs-real references).
        position_model: the position regressor (its features are the independent feature space).
        copy_thresholds: ``{"hamming", "ssim"}`` from known copies, with their calibration in ``copy_calibration``.
        decoded_training: training maps decoded so far, by index (decoding is the judge's largest cost).
    """

    settings: dict
    codebook_size: int
    decode: Callable[[np.ndarray], np.ndarray]
    train_codes: np.ndarray
    train_positions: np.ndarray
    test_codes: np.ndarray
    test_positions: np.ndarray
    test_subjects: np.ndarray
    test_images: Callable[[np.ndarray], np.ndarray]
    train_images: Callable[[np.ndarray], np.ndarray]
    position_model: SliceCNN
    copy_thresholds: dict
    copy_calibration: dict
    decoded_training: dict = field(default_factory=dict)

    def matched_test_rows(self, positions: np.ndarray) -> np.ndarray:
        """Return one real test slice per generated slice, at a similar position (seeded)."""
        return matched_real_indices(positions, self.test_positions, self.settings["match_position_window"],
                                    self.settings["seed"])

    def nearest_training_maps(self, codes: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (Hamming distances, indices), ``(N, copies_top_k)`` each, of the nearest training code maps."""
        return nearest_code_maps(codes, positions, self.train_codes, self.train_positions,
                                 self.settings["copies_position_window"], self.settings["copies_top_k"])

    def copy_scores(self, images: np.ndarray, codes: np.ndarray, positions: np.ndarray) -> dict:
        """Return each map's nearest Hamming distance, its highest SSIM to the decoded nearest training maps and
        the index of the nearest training map."""
        hamming, nearest = self.nearest_training_maps(codes, positions)
        found = nearest >= 0
        decoded = np.full((*nearest.shape, *images.shape[1:]), np.nan, np.float32)
        decoded[found] = self.decoded_training_maps(nearest[found])
        return {"hamming": hamming[:, 0], "ssim": highest_decoded_ssim(images, decoded), "nearest": nearest[:, 0]}

    def decoded_training_maps(self, indices: np.ndarray) -> np.ndarray:
        """Return the training code maps at ``indices`` decoded, each decoded once per judge."""
        missing = sorted(set(indices.tolist()) - set(self.decoded_training))
        if missing:
            self.decoded_training.update(zip(missing, self.decode(self.train_codes[missing])))
        return np.stack([self.decoded_training[i] for i in indices.tolist()])


def fit_judge(settings: dict, codebook_size: int, decode, train_codes: np.ndarray, train_positions: np.ndarray,
              test_codes: np.ndarray, test_positions: np.ndarray, test_subjects: np.ndarray, test_images,
              train_images, position_training: tuple[np.ndarray, np.ndarray]) -> GenerationJudge:
    """Return a :class:`GenerationJudge`: the position regressor trained on ``position_training`` (training slices
    and their positions) and copy thresholds calibrated on perturbed copies of training maps."""
    seed = settings["seed"]
    log.info("training the position regressor on %d training slices", len(position_training[0]))
    position_model = fit_position_regressor(*position_training, settings["position_epochs"], seed,
                                            settings["judge_image_px"])
    judge = GenerationJudge(settings, codebook_size, decode, np.asarray(train_codes), np.asarray(train_positions),
                            np.asarray(test_codes), np.asarray(test_positions), np.asarray(test_subjects),
                            test_images, train_images,
                            position_model, {}, {})
    picks = np.random.default_rng(seed).choice(len(train_codes), min(settings["copies_calibration_maps"],
                                                                     len(train_codes)), replace=False)
    originals, original_positions = judge.train_codes[picks], judge.train_positions[picks]
    fractions = {name: settings[f"copies_{name}_calibration_fraction"] for name in ("hamming", "ssim")}
    hamming_copies = perturbed_copies(originals, fractions["hamming"], codebook_size, seed)
    ssim_copies = perturbed_copies(originals, fractions["ssim"], codebook_size, seed + 1)
    hamming = judge.nearest_training_maps(hamming_copies, original_positions)[0][:, 0]
    ssim = judge.copy_scores(decode(ssim_copies), ssim_copies, original_positions)["ssim"]
    judge.copy_thresholds = calibrated_thresholds(hamming, ssim)
    judge.copy_calibration = {"n_copies": int(len(picks)), "changed_fraction": fractions}
    return judge


def features_of(judge: GenerationJudge, images: np.ndarray) -> np.ndarray:
    """Return the independent features ``(N, D)`` of slices."""
    return network_outputs(judge.position_model, images, "features")


def feature_distances(real_features: np.ndarray, generated_features: np.ndarray, k: int) -> dict:
    """Return the Fréchet distance and k-NN precision/recall of generated against real features (None if too few)."""
    try:
        return {"frechet_distance": frechet_distance(generated_features, real_features),
                **precision_recall(real_features, generated_features, k)}
    except SampleSizeError as error:
        return {"frechet_distance": None, "precision": None, "recall": None, "k": k, "reason": str(error)}


def judge_samples(judge: GenerationJudge, images: np.ndarray, codes: np.ndarray, positions: np.ndarray,
                  pairs=C2ST_PAIRS) -> tuple[dict, dict]:
    """Return (metrics, per-sample arrays) of generated slices ``images`` ``(N, H, W)`` with their ``codes``
    ``(N, h, w)`` drawn at slice ``positions`` ``(N,)``.

    Metrics: ``c2st`` (each of ``pairs``), ``position_error.samples``, ``features`` (Fréchet distance, precision,
    recall against matched real test slices) and ``copies``. Arrays: each sample's nearest training map (index,
    Hamming distance, decoded SSIM) and whether it was flagged.
    """
    settings = judge.settings
    rows = judge.matched_test_rows(positions)
    real = judge.test_images(rows)
    sets = {"samples": images, "real": real}
    if any("reconstructions" in pair for pair in pairs):
        sets["reconstructions"] = judge.decode(judge.test_codes[rows])
    c2st = {}
    for pair in pairs:
        a, b = pair.split("_vs_")
        # The generated (or decoded) set is the positive class; the reference set (real test slices or their
        # reconstructions, item i matched to generated slice i) the negative one, held out subject by subject.
        c2st[pair] = classifier_two_sample_test(sets[b], sets[a], settings["c2st_folds"], settings["c2st_epochs"],
                                                settings["seed"], settings["c2st_bootstrap"],
                                                settings["judge_image_px"], judge.test_subjects[rows])
    scores = judge.copy_scores(images, codes, positions)
    flags = copy_flags(scores["hamming"], scores["ssim"], judge.copy_thresholds)
    metrics = {
        "n": int(len(images)),
        "c2st": c2st,
        "position_error": {"samples": position_mae(judge.position_model, images, positions)},
        "features": feature_distances(features_of(judge, real), features_of(judge, images), settings["pr_k"]),
        "copies": {**copies_summary(flags, scores["hamming"], scores["ssim"]), "thresholds": judge.copy_thresholds},
    }
    return metrics, {**scores, "flagged": flags, "matched_test_rows": rows}


def real_references(judge: GenerationJudge, positions: np.ndarray, all_test_images) -> tuple[dict, dict]:
    """Return what real slices score on the same measures, the yardsticks next to the samples' numbers: (metrics,
    the copy scores of the real test maps matched to ``positions``).

    Args:
        positions: the samples' slice positions (real slices are matched to them).
        all_test_images: iterable of ``(images, positions)`` chunks of every test slice (position error).
    """
    settings = judge.settings
    errors, n = 0.0, 0
    for images, chunk_positions in all_test_images:
        errors += position_mae(judge.position_model, images, chunk_positions) * len(images)
        n += len(images)
    rows = judge.matched_test_rows(positions)
    test_real = judge.test_images(rows)
    train_real = judge.train_images(positions)
    test_scores = judge.copy_scores(judge.decode(judge.test_codes[rows]), judge.test_codes[rows],
                                    judge.test_positions[rows])
    test_flags = copy_flags(test_scores["hamming"], test_scores["ssim"], judge.copy_thresholds)
    references = {
        "position_error": {"real": errors / n if n else None,
                           "chance": chance_mae(judge.train_positions, judge.test_positions)},
        "features": feature_distances(features_of(judge, test_real), features_of(judge, train_real),
                                      settings["pr_k"]),
        "copies": copies_summary(test_flags, test_scores["hamming"], test_scores["ssim"]),
    }
    return references, {**test_scores, "flagged": test_flags}


def control_code_maps(judge: GenerationJudge, codes: np.ndarray, positions: np.ndarray, names=CONTROLS
                      ) -> dict[str, np.ndarray]:
    """Return code maps that stand in for the samples ``codes`` at ``positions``, by control name:

    - ``training_maps``: a training map at a similar position for each sample: what a prior that copies would draw
      (realistic by every measure, and every map flagged as a copy);
    - ``shuffled_maps``: each sample's codes moved to random locations (the right code frequencies, no structure);
    - ``uniform_codes``: codes drawn uniformly from the codebook;
    - ``copies_mixed``: the samples with ``copies_mixed_share`` of them replaced by training maps at their
      positions (those must be flagged).
    """
    unknown = sorted(set(names) - set(CONTROLS))
    if unknown:
        raise ValueError(f"unknown generation controls {unknown}; choose among {list(CONTROLS)}")
    rng = np.random.default_rng(judge.settings["seed"] + 2)
    codes = np.asarray(codes, np.int64)
    training = judge.train_codes[matched_real_indices(positions, judge.train_positions,
                                                      judge.settings["match_position_window"],
                                                      judge.settings["seed"] + 3)]
    out = {}
    for name in names:
        if name == "training_maps":
            out[name] = training
        elif name == "shuffled_maps":
            out[name] = np.stack([rng.permutation(c.ravel()).reshape(c.shape) for c in codes])
        elif name == "uniform_codes":
            out[name] = rng.integers(0, judge.codebook_size, codes.shape)
        else:
            mixed = codes.copy()
            replaced = rng.choice(len(codes), int(round(judge.settings["copies_mixed_share"] * len(codes))),
                                  replace=False)
            mixed[replaced] = training[replaced]
            out[name] = mixed
    return out
