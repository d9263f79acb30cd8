# Config validation (defaults come from config/schema.yaml) and paths shared by every rule.
from snakemake.utils import validate


validate(config, "../config/schema.yaml")

RUN = config["run"]
RUN_DIR = f"{config['results_dir']}/{RUN}"
RESOURCES = config["resources_dir"]
SOURCE = config["dataset"]["source"]

if SOURCE == "local" and not config["dataset"]["local_dir"]:
    raise ValueError(
        "dataset.source is 'local' but dataset.local_dir is not set: add "
        "'dataset: {local_dir: /path/to/volumes}' to your config file"
    )


def out(path):
    """A path under this run's results folder."""
    return f"{RUN_DIR}/{path}"


def raw_root():
    """The folder that holds this run's raw volumes, whichever source made them."""
    if SOURCE == "demo":
        demo = config["demo"]
        return (
            f"{RESOURCES}/demo/n{demo['n_subjects']}-seed{demo['seed']}"
            f"-oasis{demo['oasis_fraction']}"
            + (f"-ds{demo['downsample']}" if demo["downsample"] != 1 else "")
        )
    if SOURCE == "local":
        return config["dataset"]["local_dir"]
    return f"{RESOURCES}/{SOURCE}/extracted"
