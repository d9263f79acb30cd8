"""Snakemake adapter for rule `report` with whole volumes (preprocess.dims 3): the HTML report and its figure PNGs."""

from pathlib import Path

from brainvq.reporting_volumes import FIGURE_NAMES, VolumeReportInputs, build_volume_report
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    inputs = VolumeReportInputs(
        metrics_json=Path(snakemake.input.metrics),
        per_scan_csv=Path(snakemake.input.per_scan),
        figures_npz=Path(snakemake.input.figures),
        vqvae_history=Path(snakemake.input.vqvae_history),
        split_csv=Path(snakemake.input.split),
        excluded_csv=Path(snakemake.input.excluded),
        montages=[Path(p) for p in snakemake.input.montages],
    )
    figures_dir = Path(snakemake.output.training_curves).parent
    # The rule names one output per figure; they must be the files build_volume_report writes.
    assert {Path(snakemake.output[name]) for name in FIGURE_NAMES} == {figures_dir / f"{n}.png" for n in FIGURE_NAMES}
    build_volume_report(inputs, snakemake.params.config, snakemake.output.html, figures_dir,
                        attribution_html=snakemake.params.attribution_html)
    log.info("wrote %s", snakemake.output.html)
