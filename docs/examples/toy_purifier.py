# %% [markdown]
# # Your own purifier, from Python
#
# A notebook in script form (each `# %%` starts a cell; VS Code and Jupytext open it as a notebook). It loads the
# fixed subset, writes a toy purifier, puts it in front of ResNet-20, evaluates it with the smoke budget of the
# `linf` suite and prints the record's summary. `tests/test_docs.py` runs it, so it stays true.
#
# Run it from the repository root: `.venv/bin/python docs/examples/toy_purifier.py` (about half a minute on a CPU).

# %%
import torch
import torch.nn.functional as F
from torch import nn

import bench

# %% [markdown]
# The fixed subset: the first 64 images of the seed-0 draw of the CIFAR-10 test split (the JPEG copy that ships
# offline, hence `cifar10-jpeg`). `subset.x` is a float tensor in [0, 1], NCHW; `subset.subset_hash` is what
# records and leaderboards compare.

# %%
subset = bench.load_subset("cifar10-jpeg", n=64, seed=0)
print(f"{subset.n} images, {tuple(subset.x.shape)}, subset hash {subset.subset_hash[:12]}")

# %% [markdown]
# A toy purifier: a 3x3 median filter. It is deterministic and differentiable almost everywhere (the gradient
# flows to the pixel the median picked), so the suite attacks it with exact gradients and no EOT or BPDA.
# Registering it with the project's own decorator makes it a defense like the others (`bench.load_defense`,
# stacking, `bench list`); running the cell again replaces the entry.


# %%
class Median3x3(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = F.pad(x, (1, 1, 1, 1), mode="reflect").unfold(2, 3, 1).unfold(3, 3, 1)
        return patches.reshape(*x.shape, 9).median(dim=-1).values


@bench.register_defense("toy-median")
class ToyMedian(bench.Defense):
    """A 3x3 median filter in front of the classifier."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__(classifier, purifier=Median3x3())


defense = bench.load_defense("toy-median", classifier="resnet20")
print(defense.describe())

# %% [markdown]
# Evaluate: the `linf` suite at its `smoke` budget (FGSM and PGD-10 at 8/255; seconds, for trying things out; use
# `budget="cpu"` or `"paper"` for numbers you report). The record is written under `runs/` and returned.

# %%
record = bench.evaluate(defense, suite="linf", budget="smoke", subset=subset)
print(record.summary())
print(f"clean {100 * record.clean_accuracy:.1f}%, robust {100 * record.robust_accuracy:.1f}%")
