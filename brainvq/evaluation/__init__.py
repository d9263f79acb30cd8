"""Rule ``evaluate``: the trained run measured on its test subjects, written to ``eval/``.

Reads the run's split, shards, codes and samples, runs the VQ-VAE and the prior, and assembles the pure measures
of ``brainvq.measures`` (whose module docstrings define each number) into ``metrics.json``, the per-slice and
per-scan tables and the figure arrays the report draws. What is measured on what:

- **Reconstruction**: every test slice and its reconstruction (``measures.similarity``). Statistics over slices,
  over scans (a scan's value = mean of its slices) and over subjects (a subject's value = mean of its scans);
  ``eval/per_scan.csv`` has one row per scan with its ``subject``.
- **Codebook**: codes used in the test code maps and their perplexity (``measures.codebook``).
- **Prior**: the PixelCNN's test NLL in bits per code, next to log2 K (uniform) and the add-one-smoothed
  training code frequencies (unigram).
- **Diversity**: mean pairwise MS-SSIM among samples, and among real test slices matched to the samples'
  slice positions. **Memorisation**: per sample, the highest SSIM to a training slice within
  ``memorisation_position_window`` of its position (widened to the nearest training slice when none is that
  close; the ``memorisation_top_k`` nearest by pixel L2 are scored), and the share above
  ``memorisation_threshold``. **FD**: Fréchet distance between Gaussians fitted to the VQ-VAE encoder's spatially
  pooled pre-quantisation features of samples and of matched test slices (with training-vs-test slices as the
  reference); not comparable to FID.
- **Probe**: from each training scan's normalised code histogram to a binary attribute (``evaluate.probe_target``,
  else the source's default), scored on test scans; the same on each scan's mean downsampled slice as the baseline.
- **Anomaly maps**: one synthetic lesion on each of ``anomaly_n_slices`` central test slices, scored by the
  smoothed |x - recon(x)| over brain pixels.

All randomness (lesions, pair subsets, matched real slices) comes from ``evaluate.seed``.

One module per section: ``reconstruction`` (reconstruction and codebook), ``generation`` (prior and samples),
``probe``, ``anomaly``; ``inputs`` loads the run once into an :class:`EvaluationRun` they all measure from, and
``run`` calls them in turn (``SECTIONS``) and writes the outputs.
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
    "vqvae_codebook_size",
    "write_evaluation",
]
