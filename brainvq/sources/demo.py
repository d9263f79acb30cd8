"""The offline demo cohort (``dataset.source: demo``), built by the demo_cohort rule (``brainvq/demo.py``).

Synthetic heads from the MNI152 template that ships with nilearn, written in the IXI layout (NIfTI)
and the OASIS-1 RAW layout (big-endian Analyze), with a participants.tsv alongside. Settings: ``demo``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from brainvq.demographics import read_participants_tsv, with_scanned_subjects
from brainvq.sources import Source
from brainvq.sources.ixi import ixi_rows
from brainvq.sources.oasis1 import oasis1_rows


class Demo(Source):
    name = "demo"
    kind = "generated"
    layout = "IXI###-<site>-####-T1.nii.gz files and OAS1_####_MR1/RAW/*_mpr-1_anon.hdr (run the demo_cohort rule)"
    # Stratify by atrophy so both halves of it (the probe target) reach the few test subjects. The cohort writes
    # each subject's true brain mask beside its volume, so 'precomputed' skull stripping is exact.
    defaults = {"stratify": "atrophy", "probe_target": "atrophy>median", "skull_strip": "precomputed"}
    attribution_html = """\
<p>This run uses the offline demo cohort: synthetic subjects derived from the MNI152 ICBM 2009 nonlinear template
(Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average age-appropriate brain
templates from birth to adulthood. <em>NeuroImage</em> 2009;47:S102; Fonov V et al. <em>NeuroImage</em>
2011;54(1):313–327, <a href="https://doi.org/10.1016/j.neuroimage.2010.07.033">doi:10.1016/j.neuroimage.2010.07.033</a>),
as shipped with <a href="https://nilearn.github.io/">nilearn</a> (<code>nilearn.datasets.load_mni152_template</code>).
Template © McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University; see the
<a href="https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009">ICBM 2009 page</a> for its terms.
The demo subjects, their "atrophy" and demographics are simulated: they say nothing about real people.</p>
"""

    def raw_root(self, config: dict) -> str:
        """One folder per cohort setting, so a changed setting builds a new cohort beside the old one."""
        demo = config["demo"]
        return (
            f"{config['resources_dir']}/demo/n{demo['n_subjects']}-seed{demo['seed']}"
            f"-oasis{demo['oasis_fraction']}"
            + (f"-ds{demo['downsample']}" if demo["downsample"] != 1 else "")
        )

    def discovery_settings(self, config: dict) -> dict:
        # The OASIS-like scans are read as OASIS-1 RAW images are.
        oasis1 = config["datasets"]["oasis1"]
        return {"orientation": oasis1["orientation"]["raw_mpr1"], "include_mr2": oasis1["include_mr2"]}

    def find_rows(self, raw_root: Path, settings: dict) -> list[dict]:
        return ixi_rows(raw_root) + oasis1_rows(raw_root, "raw_mpr1", settings["orientation"], settings["include_mr2"])

    def participants(self, raw_root: Path, settings: dict, scans: pd.DataFrame) -> pd.DataFrame:
        """The participants.tsv the demo_cohort rule wrote, plus an empty row for any other scanned subject."""
        return with_scanned_subjects(read_participants_tsv(Path(raw_root) / "participants.tsv"), scans)


SOURCE = Demo()
