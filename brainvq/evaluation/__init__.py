"""Rule ``evaluate``: the trained run measured on its test subjects, written to ``eval/``.

Reads the run's split, shards, codes and samples, runs the VQ-VAE and the prior, and assembles the pure measures
of ``brainvq.measures`` (whose module docstrings define each number) into ``metrics.json``, the per-slice and
per-scan tables and the figure arrays the report draws. What is measured on what:

- **Reconstruction**: every test slice and its reconstruction (``measures.similarity``). Statistics over slices,
  over scans (a scan's value = mean of its slices) and over subjects (a subject's value = mean of its scans);
  ``eval/per_scan.csv`` has one row per scan with its ``subject``.
- **Codebook**: codes used in the test code maps and their perplexity (``measures.codebook``).
- **Prior**: the PixelCNN's test NLL in bits per code over whole maps and over code positions inside the shards'
  mask, next to context-free baselines fitted on training maps (``measures.baselines``): uniform (log2 K), global
  unigram, per-location unigram and per-location-and-position-bin unigram.
- **Generation** (``judge``): the samples against real test slices matched in slice position and against their
  reconstructions (decoded test code maps): classifier two-sample AUROCs, the error of a position regressor trained
  on training slices, Fréchet distance and k-NN precision/recall in that regressor's features (not the judged
  VQ-VAE's), and copies of training code maps (Hamming distance, SSIM against decoded training maps, thresholds
  calibrated on known copies); the same on real references and on control sets (``evaluate.generation_controls``).
  Diversity (mean pairwise MS-SSIM) and the old VQ-VAE-feature FD, labelled as such, are kept for comparison.
- **Probe**: from each training scan's normalised code histogram to a binary attribute (``evaluate.probe_target``,
  else the source's default), scored on test scans; the same on each scan's mean downsampled slice as the baseline.
- **Anomaly maps**: one synthetic lesion on each of ``anomaly_n_slices`` central test slices, scored by the
  smoothed |x - recon(x)| over brain pixels.

All randomness (lesions, pair subsets, matched real slices, judging networks, controls) comes from ``evaluate.seed``.

One module per section: ``reconstruction`` (reconstruction and codebook), ``generation`` (prior and samples, with
the fitted ``judge``), ``probe``, ``anomaly``; ``inputs`` loads the run once into an :class:`EvaluationRun` they
all measure from, and ``run`` calls them in turn (``SECTIONS``) and writes the outputs.
"""

from brainvq.evaluation.generation import FD_LABEL
from brainvq.evaluation.inputs import (
    EvaluationInputError,
    EvaluationInputs,
    EvaluationResult,
    EvaluationRun,
    PriorScorer,
    prior_scorer,
    read_samples,
    evaluation_model,
    vqvae_codebook_size,
)
from brainvq.evaluation.probe import probe_target_spec
from brainvq.evaluation.reconstruction import reconstruction_summary
from brainvq.evaluation.run import evaluate_run, json_ready, software_versions, write_evaluation

__all__ = [
    "FD_LABEL",
    "EvaluationInputError",
    "EvaluationInputs",
    "EvaluationResult",
    "EvaluationRun",
    "PriorScorer",
    "evaluate_run",
    "json_ready",
    "prior_scorer",
    "probe_target_spec",
    "read_samples",
    "reconstruction_summary",
    "software_versions",
    "evaluation_model",
    "vqvae_codebook_size",
    "write_evaluation",
]
