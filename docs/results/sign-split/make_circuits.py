"""Split the shipped top-0.1% refusal circuit by which prompt set drives each neuron harder.

``refusal-harm-active``: |μ+| > |μ−| (more active on harmful prompts); ``refusal-benign-active``:
the rest. Ablating (m = 0) a harm-active neuron moves it toward the benign mean; ablating a
benign-active one moves it *away* from the benign mean.

    python docs/results/sign-split/make_circuits.py
"""

from dataclasses import replace
from pathlib import Path

import numpy as np

from cna_vllm.circuit import Circuit

HERE = Path(__file__).parent
source = Circuit.load(HERE.parents[2] / "circuits" / "qwen2.5-coder-0.5b-instruct" / "refusal.safetensors")
harm = np.abs(source.mean_pos) > np.abs(source.mean_neg)
for name, mask in (("refusal-harm-active", harm), ("refusal-benign-active", ~harm)):
    part = replace(
        source,
        name=name,
        description=f"{name}: the neurons of {source.name!r} with "
        + ("|μ+| > |μ−|" if mask is harm else "|μ+| ≤ |μ−|"),
        **{key: getattr(source, key)[mask] for key in ("layers", "neurons", "score", "mean_pos", "mean_neg")},
    )
    print(name, len(part), part.save(HERE / "circuits" / f"{name}.safetensors"))
