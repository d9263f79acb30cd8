"""Pure evaluation measures: arrays in, numbers (or small tables) out; no file, model or config I/O.

One concept per module:

- ``similarity``: SSIM, brain-box SSIM, MS-SSIM, MSE/PSNR of image pairs, and the per-slice table of them.
- ``statistics``: summary statistics, and means per scan and per subject of per-slice values.
- ``codebook``: code counts, codebook usage and perplexity.
- ``distributions``: sets of images or features compared: Fréchet distance, k-NN precision and recall,
  pairwise diversity, position matching.
- ``slice_networks``: the small CNNs that judge slices (two-sample classifier, position regressor).
- ``two_sample``: the classifier two-sample test (held-out AUROC with a bootstrap interval).
- ``position``: position consistency (a slice-position regressor's error on real slices and samples).
- ``copies``: nearest training code maps (Hamming, decoded SSIM) and copy flags calibrated on known copies.
- ``baselines``: context-free baselines of a prior over code maps (uniform, unigram, per-location unigram).
- ``probe``: binary probe targets and the logistic-regression probe.
- ``anomaly``: synthetic lesions, anomaly score maps and pixel AUROC.

``brainvq.evaluation`` reads a run's files, runs its models and assembles these measures into ``metrics.json``.
"""
