# Stage 'demo' (see docs/architecture.md): the offline demo cohort, synthetic heads built from
# the MNI152 template inside the nilearn wheel, written as IXI-like NIfTI and OASIS-like Analyze.


# The demo (brainvq/sources/demo.py) is the source whose raw folder a rule generates.
if SOURCE.kind == "generated":

    rule demo_cohort:
        output:
            directory(raw_root()),
        log:
            out("logs/demo_cohort.log"),
        benchmark:
            out("benchmarks/demo_cohort.tsv")
        conda:
            "../envs/preprocess.yaml"
        threads: 2
        params:
            n_subjects=config["demo"]["n_subjects"],
            seed=config["demo"]["seed"],
            oasis_fraction=config["demo"]["oasis_fraction"],
            downsample=config["demo"]["downsample"],
            # Each volume gets its true brain mask beside it (<name>_brainmask); a cohort built without them is redone.
            brain_masks=True,
        script:
            "../workflow_scripts/demo_cohort.py"
