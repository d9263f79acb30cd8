"""The prior learns a known source, resumes exactly through the engine, and reads the quantize/split outputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from brainvq.engine import CheckpointError, load_checkpoint
from brainvq.prior import (
    CodesError,
    LabelConfigError,
    PriorTask,
    bits_per_code,
    code_maps,
    load_prior,
    train_prior,
    training_maps,
    uniform_bits,
    unigram_bits,
)
from conftest import as_maps, killed_at_step
from conftest import tiny_pixelcnn_config as tiny_config
from conftest import train_tiny_prior as train_tiny

torch.set_num_threads(1)


def markov_source(codebook_size: int, stay: float) -> np.ndarray:
    """Transition matrix: the next code is (left + 1) mod K with probability ``stay``, otherwise any other code."""
    matrix = np.full((codebook_size, codebook_size), (1 - stay) / (codebook_size - 1))
    matrix[np.arange(codebook_size), (np.arange(codebook_size) + 1) % codebook_size] = stay
    return matrix


def markov_maps(matrix: np.ndarray, n: int, size: int, seed: int) -> np.ndarray:
    """Draw (n, size, size) maps: first column uniform, each later code from its left neighbour's row."""
    rng = np.random.default_rng(seed)
    k = len(matrix)
    maps = np.zeros((n, size, size), np.int64)
    maps[:, :, 0] = rng.integers(0, k, (n, size))
    cumulative = matrix.cumsum(1)
    for j in range(1, size):
        u = rng.random((n, size, 1))
        maps[:, :, j] = (u > cumulative[maps[:, :, j - 1]]).sum(-1)
    return maps


def markov_entropy_bits(matrix: np.ndarray, size: int) -> float:
    """Exact entropy per code of ``markov_maps``: log2 K for the first column, the row entropy after."""
    row_entropy = -(matrix[0] * np.log2(matrix[0])).sum()
    return (math.log2(len(matrix)) + (size - 1) * row_entropy) / size


# --------------------------------------------------------------------------------------- likelihood


def test_prior_learns_a_markov_source_down_to_its_entropy_rate(tmp_path):
    k, size = 16, 8
    matrix = markov_source(k, stay=0.8)
    train, test = markov_maps(matrix, 2048, size, seed=0), markov_maps(matrix, 64, size, seed=1)
    _, (model_path, _, _) = train_tiny(tmp_path, as_maps(train), as_maps(test[:8]), k, steps=300)
    nll = bits_per_code(load_prior(model_path), test, np.full(len(test), 0.5))
    truth = markov_entropy_bits(matrix, size)
    assert truth - 0.05 < nll < truth + 0.12
    assert nll < 0.5 * uniform_bits(k)


def test_uniform_bits_is_log2_of_the_codebook_size():
    assert uniform_bits(512) == pytest.approx(9.0)


def test_unigram_bits_is_add_one_smoothed_cross_entropy():
    train = np.array([0, 0, 0, 1])  # counts + 1 over K=3: [4, 2, 1] / 7
    test = np.array([0, 2])
    expected = -(math.log2(4 / 7) + math.log2(1 / 7)) / 2
    assert unigram_bits(train, test, 3) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------- training


def test_training_writes_model_and_history_loadable_with_weights_only(tmp_path):
    codes = np.random.default_rng(0).integers(0, 8, (40, 6, 6))
    summary, (model_path, history_path, checkpoint_path) = train_tiny(tmp_path, as_maps(codes), as_maps(codes[:4]), 8)
    state = torch.load(model_path, weights_only=True)
    assert state["codebook_size"] == 8 and state["config"]["channels"] == 16
    history = pd.read_csv(history_path)
    assert list(history.columns) == ["step", "train_nll_bits", "val_nll_bits", "codes_per_s", "slices_per_s", "lr"]
    assert history["step"].tolist() == [5, 10, 15, 20]
    assert history["val_nll_bits"].notna().tolist() == [False, True, False, True]
    assert torch.load(checkpoint_path, weights_only=True)["step"] == 20
    assert summary["finished"] and summary["val_nll_bits"] == pytest.approx(history["val_nll_bits"].iloc[-1])


def test_a_rerun_after_completion_rewrites_the_model_from_the_final_checkpoint_without_training(tmp_path):
    codes = np.random.default_rng(0).integers(0, 8, (40, 6, 6))
    _, (model_path, _, checkpoint_path) = train_tiny(tmp_path, as_maps(codes), as_maps(codes[:4]), 8)
    state = torch.load(checkpoint_path, weights_only=True)
    state["model"]["embedding.weight"].fill_(0.125)  # a mark that training would not reproduce
    torch.save(state, checkpoint_path)
    model_path.unlink()
    train_tiny(tmp_path, as_maps(codes), as_maps(codes[:4]), 8)
    rewritten = torch.load(model_path, weights_only=True)["model"]["embedding.weight"]
    assert torch.all(rewritten == 0.125)


def test_interrupted_training_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path):
    codes = np.random.default_rng(0).integers(0, 8, (40, 6, 6))
    train, val = as_maps(codes), as_maps(codes[:4])
    _, (straight, straight_history, _) = train_tiny(tmp_path, train, val, 8, name="straight")
    paths = [tmp_path / "resumed" / f for f in ("model.pt", "history.csv", "checkpoints/last.pt")]
    stopped = train_prior(train, val, tiny_config(), 8, [], paths[0].parent, stop_at_step=10, progress=False)
    assert not stopped["finished"] and not paths[0].exists() and paths[2].exists()
    paths[1].unlink()  # Snakemake deletes the outputs of a failed job; the history must come back from the checkpoint
    train_prior(train, val, tiny_config(), 8, [], paths[0].parent, progress=False)
    a, b = torch.load(straight, weights_only=True), torch.load(paths[0], weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(
        pd.read_csv(straight_history).drop(columns=["codes_per_s", "slices_per_s"]),
        pd.read_csv(paths[1]).drop(columns=["codes_per_s", "slices_per_s"]),
    )


def test_killed_training_resumes_to_the_same_weights_and_history_as_an_uninterrupted_run(tmp_path, monkeypatch):
    codes = np.random.default_rng(0).integers(0, 8, (40, 6, 6))
    train, val = as_maps(codes), as_maps(codes[:4])
    # Checkpoints every 4 steps, history rows every 5: the kill falls between a checkpoint and a row.
    _, (straight, straight_history, _) = train_tiny(tmp_path, train, val, 8, name="straight", checkpoint_every=4)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(PriorTask, "loss_terms", killed_at_step(PriorTask, 11))
        train_tiny(tmp_path, train, val, 8, name="killed", checkpoint_every=4)
    killed = tmp_path / "killed"
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["step"] == 8 and not (killed / "model.pt").exists()
    train_tiny(tmp_path, train, val, 8, name="killed", checkpoint_every=4)

    a, b = (torch.load(path, weights_only=True)["model"] for path in (straight, killed / "model.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    pd.testing.assert_frame_equal(
        pd.read_csv(straight_history).drop(columns=["codes_per_s", "slices_per_s"]),
        pd.read_csv(killed / "history.csv").drop(columns=["codes_per_s", "slices_per_s"]),
        check_exact=True,
    )


def test_resume_refuses_a_checkpoint_written_under_another_config(tmp_path):
    codes = np.random.default_rng(0).integers(0, 8, (40, 6, 6))
    train_prior(as_maps(codes), as_maps(codes[:4]), tiny_config(), 8, [], tmp_path, stop_at_step=5, progress=False)
    with pytest.raises(CheckpointError, match="pixelcnn.channels"):
        train_prior(as_maps(codes), as_maps(codes[:4]), tiny_config(channels=8), 8, [], tmp_path, progress=False)


def test_training_refuses_codes_outside_the_codebook(tmp_path):
    codes = np.full((4, 6, 6), 9)
    with pytest.raises(CodesError, match="codebook"):
        train_tiny(tmp_path, as_maps(codes), as_maps(codes[:0]), 8)


# ------------------------------------------------------------------------------- quantize/split inputs


def write_codes_dir(tmp_path, scans: dict[str, tuple[str, bool, str]], n_slices: int = 3):
    """Write codes/{split}/{scan}.npy, codes/index.csv and split.csv; ``scans``: scan -> (split, validation, sex)."""
    codes_dir = tmp_path / "codes"
    rows, split_rows = [], []
    for k, (scan, (split, validation, sex)) in enumerate(scans.items()):
        (codes_dir / split).mkdir(parents=True, exist_ok=True)
        np.save(codes_dir / split / f"{scan}.npy", np.full((n_slices, 4, 4), k, np.int16))
        for row in range(n_slices):
            rows.append(dict(subject=scan, scan=scan, split=split, slice_index=10 + row,
                             slice_position=row / (n_slices - 1), file=f"{split}/{scan}.npy", row=row))
        split_rows.append(dict(scan=scan, subject=scan, session="", split=split, validation=validation,
                               site="A", sex=sex, age=50))
    pd.DataFrame(rows).to_csv(codes_dir / "index.csv", index=False)
    pd.DataFrame(split_rows).to_csv(tmp_path / "split.csv", index=False)
    return codes_dir, tmp_path / "split.csv"


def test_training_maps_exclude_validation_and_test_subjects(tmp_path):
    codes_dir, split_csv = write_codes_dir(tmp_path, {
        "S0": ("train", False, "F"), "S1": ("train", True, "M"),
        "S2": ("test", False, None), "S3": ("train", False, "M"),
    })
    train, val, classes = training_maps(codes_dir, split_csv, "sex")
    assert set(train.scans) == {"S0", "S3"} and set(val.scans) == {"S1"}
    assert classes == ["F", "M", "n/a"]
    assert sorted(np.unique(train.codes)) == [0, 3] and train.codes.shape == (6, 4, 4)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.positions.tolist() == pytest.approx([0, 0.5, 1, 0, 0.5, 1])
    test = code_maps(codes_dir, pd.read_csv(split_csv).assign(validation=lambda t: t["validation"].astype(bool)),
                     "test")
    assert set(test.scans) == {"S2"} and test.labels is None


def test_unknown_condition_label_column_names_the_config_key(tmp_path):
    codes_dir, split_csv = write_codes_dir(tmp_path, {"S0": ("train", False, "F")})
    with pytest.raises(LabelConfigError, match="pixelcnn.condition_label"):
        training_maps(codes_dir, split_csv, "handedness")


def test_missing_code_file_is_reported_with_the_rule_to_rerun(tmp_path):
    codes_dir, split_csv = write_codes_dir(tmp_path, {"S0": ("train", False, "F")})
    (codes_dir / "train" / "S0.npy").unlink()
    with pytest.raises(CodesError, match="quantize"):
        training_maps(codes_dir, split_csv, None)


def test_a_fresh_prior_starts_at_the_unigram_baseline():
    from brainvq.prior import build_prior, model_kwargs, start_from_unigram

    codes = np.random.default_rng(0).choice(6, size=(20, 5, 5), p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    model = build_prior(model_kwargs(tiny_config(), 6, (5, 5), 0))
    start_from_unigram(model, codes)
    assert bits_per_code(model, codes, np.full(20, 0.5)) == pytest.approx(unigram_bits(codes, codes, 6), rel=1e-5)
