"""The verdict rule (PROTOCOL rule 8) and what an attack keeps for each point.

**One rule for "broken".** A point is broken when its adversarial example is misclassified: for a deterministic
model by the model, for a stochastic one by any of ``draws`` fresh forward passes (the record's re-classification
rule). The same ``Judge`` decides inside every attack (a point leaves an attack only when the judge confirms it) and
in the evaluation afterwards: the judge keeps every verdict it gave (``Judge.ledger``, keyed by the example's bytes),
and the evaluation re-uses a verdict for the example the attack returns instead of drawing again, so a point an
attack confirmed broken can never be counted robust by luck afterwards.

An attack asks the judge only about candidates its own evidence calls misclassified (the argmax of the logits it
already holds: EOT-averaged, a single draw, or a deterministic pass). For a deterministic model whose logits came
from the real forward that evidence *is* the verdict and costs nothing; otherwise the judge draws ``draws`` fresh
forward passes of the real model (the defense, never a BPDA view's surrogate gradient or a stand-in model).

**Best candidate.** For every point it has not broken an attack returns its best candidate over all steps,
restarts and targets, never the clean image: the candidate with the **lowest margin** z_y - max_{i != y} z_i of the
logits the attack saw for it (EOT-averaged for a stochastic defense). The margin is the one currency that compares
across losses (CE, DLR, targeted DLR), targets and attacks. ``Candidates`` keeps both, per point.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from typing import Dict, Iterator, Optional

import torch

#: Images per forward pass when the judge stacks several draws of a few examples into one batch (as EOT does).
JUDGE_CHUNK_IMAGES = 128
#: Re-classification draws of a stochastic model when no evaluation set them (an attack used on its own).
DEFAULT_DRAWS = 10


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i per row: positive when classified right, negative when wrong."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    return true - logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values


def digest(row: torch.Tensor) -> bytes:
    """Identity of one example: a hash of its float32 bytes."""
    return hashlib.blake2b(row.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()


class Judge:
    """Decides which candidates are broken, with ``draws`` fresh forward passes of ``model`` for a stochastic one.

    ``ledger`` maps each judged example to the number of its draws that classified it right (all verdicts, broken
    or not); ``forced`` holds examples an outside verdict broke (pyautoattack's own single pass, say).
    """

    def __init__(self, model, draws: int = 1, stochastic: Optional[bool] = None,
                 chunk_images: int = JUDGE_CHUNK_IMAGES) -> None:
        self.model = model
        self.stochastic = bool(getattr(model, "stochastic", False)) if stochastic is None else bool(stochastic)
        self.draws = draws if self.stochastic else 1
        self.chunk_images = chunk_images
        self.ledger: Dict[bytes, int] = {}
        self.forced: set = set()

    @classmethod
    def for_model(cls, model) -> "Judge":
        """The judge an attack uses when no evaluation gave it one."""
        return cls(model, DEFAULT_DRAWS)

    def classify(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Right draws per row (``draws`` forward passes, several draws stacked per pass when the rows are few);
        every verdict goes into the ledger."""
        right = torch.zeros(len(y), dtype=torch.long, device=y.device)
        per_pass = max(1, min(self.draws, self.chunk_images // max(len(y), 1)))
        done = 0
        with torch.inference_mode():
            while done < self.draws:
                k = min(per_pass, self.draws - done)
                preds = self.model(x.repeat(k, *([1] * (x.dim() - 1)))).argmax(1).view(k, len(y))
                right += (preds == y).sum(0)
                done += k
        for row, r in zip(x, right.tolist()):
            self.ledger[digest(row)] = r
        return right

    def __call__(self, x: torch.Tensor, y: torch.Tensor, logits: Optional[torch.Tensor] = None,
                 real: bool = True) -> torch.Tensor:
        """Broken mask for candidates ``x`` whose logits the attack holds (``real``: from the real forward)."""
        wrong = logits.argmax(1) != y if logits is not None else torch.ones_like(y, dtype=torch.bool)
        if not self.stochastic and real and logits is not None:
            for row in x[wrong]:
                self.ledger[digest(row)] = 0
            return wrong
        broken = torch.zeros_like(wrong)
        if wrong.any():
            broken[wrong] = self.classify(x[wrong], y[wrong]) < self.draws
        return broken

    def force(self, x: torch.Tensor) -> None:
        """Record an outside verdict: these examples are broken whatever the draws say."""
        for row in x:
            self.forced.add(digest(row))

    def verdict(self, row: torch.Tensor) -> Optional[int]:
        """Right draws of an example already judged (0 if an outside verdict broke it), or None."""
        key = digest(row)
        if key in self.forced:
            return 0
        return self.ledger.get(key)


_CURRENT: contextvars.ContextVar[Optional[Judge]] = contextvars.ContextVar("bench_judge", default=None)


@contextlib.contextmanager
def judging(judge: Judge) -> Iterator[Judge]:
    """Attacks started inside this block judge with ``judge`` (the evaluation's, with its draws and ledger)."""
    token = _CURRENT.set(judge)
    try:
        yield judge
    finally:
        _CURRENT.reset(token)


def current_judge() -> Optional[Judge]:
    return _CURRENT.get()


def _first_per_owner(owners: torch.Tensor) -> torch.Tensor:
    """Mask of the first row of each owner in ``owners``."""
    if owners.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=owners.device)
    unique, inverse = torch.unique(owners, return_inverse=True)
    order = torch.arange(len(owners), device=owners.device)
    first = torch.full((len(unique),), len(owners), device=owners.device, dtype=order.dtype)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    mask = torch.zeros(len(owners), dtype=torch.bool, device=owners.device)
    mask[first] = True
    return mask


class Candidates:
    """Per point of an attack's batch: its best candidate so far and whether the judge confirmed it broken.

    ``offer(owners, x_cand, logits)`` hands over candidates (rows may share an owner point: restarts or targets run
    side by side) with the logits the attack saw for them; it returns, per row, whether to keep attacking. Without
    early stop (``early_stop=False``: attacks run to completion so that mean and majority over the draws mean
    something) nothing is judged on the way and every row keeps going; the evaluation judges the returned example.
    """

    def __init__(self, oracle, x: torch.Tensor, y: torch.Tensor, early_stop: bool = True) -> None:
        self.oracle, self.y, self.early_stop = oracle, y, early_stop
        self.clean = x.detach()
        self.x = x.detach().clone()
        self.margin = torch.full((len(y),), float("inf"), device=x.device)
        self.broken = torch.zeros(len(y), dtype=torch.bool, device=x.device)

    def open(self) -> torch.Tensor:
        """Indices of the points still to attack."""
        return (~self.broken).nonzero().flatten() if self.early_stop else torch.arange(len(self.y), device=self.y.device)

    def offer(self, owners: torch.Tensor, x_cand: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        x_cand = x_cand.detach()
        m = margin(logits, self.y[owners])
        self._keep_best(owners, x_cand, m)
        if not self.early_stop:
            return torch.ones(len(owners), dtype=torch.bool, device=owners.device)
        undecided = ~self.broken[owners]
        if undecided.any():
            rows = undecided.nonzero().flatten()
            hit = self.oracle.judge_candidates(x_cand[rows], self.y[owners[rows]], logits[rows])
            rows = rows[hit]
            rows = rows[_first_per_owner(owners[rows])]
            self.x[owners[rows]] = x_cand[rows]
            self.margin[owners[rows]] = m[rows]
            self.broken[owners[rows]] = True
        return ~self.broken[owners]

    def _keep_best(self, owners: torch.Tensor, x_cand: torch.Tensor, m: torch.Tensor) -> None:
        moved = (x_cand != self.clean[owners]).flatten(1).any(1)  # the clean image is never a point's best candidate
        m = torch.where(moved, m, torch.full_like(m, float("inf")))
        best = torch.full_like(self.margin, float("inf")).scatter_reduce(0, owners, m, reduce="amin")
        better = (m == best[owners]) & (m < self.margin[owners]) & ~self.broken[owners]
        rows = better.nonzero().flatten()
        rows = rows[_first_per_owner(owners[rows])]
        self.x[owners[rows]] = x_cand[rows]
        self.margin[owners[rows]] = m[rows]
