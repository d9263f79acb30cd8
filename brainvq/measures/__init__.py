"""Pure evaluation measures: arrays in, numbers (or small tables) out; no file, model or config I/O.

One concept per module:

- ``similarity``: SSIM, brain-box SSIM, MS-SSIM, MSE/PSNR of image pairs, and the per-slice table of them.
- ``statistics``: summary statistics, and means per scan and per subject of per-slice values.
- ``codebook``: code counts, codebook usage and perplexity.
- ``distributions``: sets of images or features compared: Fréchet distance, pairwise diversity, position
  matching.
- ``memorisation``: each sample's highest SSIM to a reference slice at a similar position.
- ``probe``: binary probe targets and the logistic-regression probe.
- ``anomaly``: synthetic lesions, anomaly score maps and pixel AUROC.

``brainvq.evaluation`` reads a run's files, runs its models and assembles these measures into ``metrics.json``.
"""
