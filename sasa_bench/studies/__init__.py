"""Studies: the paper's ablations as declarative files (``ablations/*.toml``), expanded into
ModelSpecs and run through the same pipeline as single models (FLOPs, latency, training).

    spec.py    parse + validate one study file -> :class:`Study`
    expand.py  Study -> variants (one ModelSpec each) -> (variant, seed) units, sharding
    runner.py  run the units: params/GFLOPS, latency vs the study's baseline, training; resume
"""

from sasa_bench.studies.expand import Unit, Variant, expand, shard_units, units
from sasa_bench.studies.spec import Study, VariantDef, find_studies, load_study, studies_dir

__all__ = [
    "Study",
    "Unit",
    "Variant",
    "VariantDef",
    "expand",
    "find_studies",
    "load_study",
    "shard_units",
    "studies_dir",
    "units",
]
