r"""A conditional variational autoencoder on the 8x8 digits: where the label enters.

The experiment of chapter 11's section on conditional BN. An encoder maps
an image ``x`` (64 pixels in ``[0, 1]``) to a Gaussian
``q(z | x) = N(mu, diag(exp(log_var)))`` over a ``latent``-dim code; a
decoder maps a code ``z`` and a class label ``k`` to 64 pixel
probabilities. Training minimizes the negative evidence lower bound
(Kingma and Welling 2014; with a label, Sohn et al. 2015), per image:

.. math::

    \underbrace{-\sum_{p=1}^{64} \big[x_p \log \hat{x}_p + (1 - x_p) \log (1 - \hat{x}_p)\big]}_{\text{reconstruction}}
    \; + \; \underbrace{\tfrac12 \sum_j \big(\mu_j^2 + e^{\mathrm{lv}_j} - 1 - \mathrm{lv}_j\big)}_{\mathrm{KL}(q(z|x)\,\|\,N(0, I))},

``x_hat`` the decoder's output for ``z = mu + exp(lv / 2) * e``, ``e ~ N(0, I)``.

The decoder gets the label in one of three ways (``condition``):

- ``"bn"``: only through its BN layers' ``gamma`` and ``beta``
  (:class:`bnlib.conditional.ConditionalBatchNorm1d`), a row per class;
- ``"input"``: a one-hot vector next to ``z`` at its input, plain BN;
- ``None``: not at all (the labels are ignored).

The encoder never sees the label. Averaged over images, the KL term bounds
the information the code carries about the image; a decoder that gets the
label need not have the class written into the code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnlib import nn as bnn
from bnlib._checks import check_integer_at_least
from bnlib.data import Split, load_digit_pixels  # noqa: F401 (the chapter calls it from here)
from bnlib.models import _seeded, modes_kept
from bnlib.training import minibatches

__all__ = ["CONDITIONS", "Encoder", "Decoder", "CVAEResult", "load_digit_pixels", "negative_elbo",
           "train_cvae", "evaluate_cvae", "generate", "one_class_batches"]

#: Where the decoder takes the label, in its BN layers' gamma and beta ("bn"),
#: one-hot at its input ("input"), or not at all (None).
CONDITIONS = ("bn", "input", None)
NUM_CLASSES = 10
PIXELS = 64


class Encoder(nn.Module):
    """``x (N, 64) -> (mu, log_var)``, each ``(N, latent)``: Linear, BN, ReLU, Linear."""

    def __init__(self, latent: int, hidden: int):
        super().__init__()
        self.latent = latent
        self.body = nn.Sequential(nn.Linear(PIXELS, hidden), bnn.BatchNorm1d(hidden), nn.ReLU(),
                                  nn.Linear(hidden, 2 * latent))

    def forward(self, x):
        mu, log_var = self.body(x).chunk(2, dim=1)
        return mu, log_var


class Decoder(nn.Module):
    """``(z (N, latent), labels (N,)) -> logits (N, 64)``: two blocks Linear, BN, ReLU, then Linear.

    ``condition`` (one of :data:`CONDITIONS`) says how the label gets in:
    see the module docstring.
    """

    def __init__(self, latent: int, hidden: int, condition: str | None):
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
        super().__init__()
        self.condition = condition
        width_in = latent + (NUM_CLASSES if condition == "input" else 0)
        self.fc1, self.fc2 = nn.Linear(width_in, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, PIXELS)
        if condition == "bn":
            self.norm1 = bnn.ConditionalBatchNorm1d(hidden, NUM_CLASSES)
            self.norm2 = bnn.ConditionalBatchNorm1d(hidden, NUM_CLASSES)
        else:
            self.norm1, self.norm2 = bnn.BatchNorm1d(hidden), bnn.BatchNorm1d(hidden)

    def _norm(self, norm, h, labels):
        return norm(h, labels) if self.condition == "bn" else norm(h)

    def forward(self, z, labels):
        if self.condition == "input":
            z = torch.cat([z, F.one_hot(labels, NUM_CLASSES).to(z.dtype)], dim=1)
        h = F.relu(self._norm(self.norm1, self.fc1(z), labels))
        h = F.relu(self._norm(self.norm2, self.fc2(h), labels))
        return self.out(h)


def negative_elbo(encoder, decoder, x, labels, noise):
    """``(reconstruction, kl)`` of the module docstring, each the mean over the rows of ``x``, in nats.

    ``noise``: the ``e`` of ``z = mu + exp(log_var / 2) * e``, shape ``(N, latent)``.
    """
    mu, log_var = encoder(x)
    z = mu + torch.exp(0.5 * log_var) * noise
    logits = decoder(z, labels)
    reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)
    kl = 0.5 * (mu.square() + log_var.exp() - 1 - log_var).sum() / len(x)
    return reconstruction, kl


@dataclass
class CVAEResult:
    """A trained encoder and decoder, with the last epoch's mean training loss terms (nats per image)."""

    encoder: Encoder
    decoder: Decoder
    train_reconstruction: float
    train_kl: float


def train_cvae(data: Split, condition: str | None, *, latent: int = 8, hidden: int = 128, epochs: int = 150,
               batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> CVAEResult:
    """Train an :class:`Encoder` and a :class:`Decoder` with Adam on ``data.x_train`` (pixels in [0, 1]).

    Mini-batches are a fresh random order each epoch (the last, smaller
    batch dropped); ``seed`` fixes the weights, the order and the noise.
    Returns the models in eval mode.
    """
    check_integer_at_least("epochs", epochs, 1)
    with _seeded(seed):  # (the caller's random state is left alone)
        encoder, decoder = Encoder(latent, hidden), Decoder(latent, hidden, condition)
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    x, y = data.x_train, data.y_train
    for _ in range(epochs):
        terms = []
        for idx in minibatches(len(x), batch_size, generator):
            noise = torch.randn(len(idx), latent, generator=generator)
            reconstruction, kl = negative_elbo(encoder, decoder, x[idx], y[idx], noise)
            optimizer.zero_grad()
            (reconstruction + kl).backward()
            optimizer.step()
            terms.append((reconstruction.item(), kl.item()))
    last = np.mean(terms, axis=0)
    return CVAEResult(encoder.eval(), decoder.eval(), float(last[0]), float(last[1]))


@torch.no_grad()
def evaluate_cvae(result: CVAEResult, x: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """``(reconstruction, kl)`` per image on ``x`` in eval mode, one draw of the noise (``seed``);
    the models' modes are restored afterwards."""
    noise = torch.randn(len(x), result.encoder.latent, generator=torch.Generator().manual_seed(seed))
    with modes_kept(result.encoder), modes_kept(result.decoder):
        reconstruction, kl = negative_elbo(result.encoder.eval(), result.decoder.eval(), x, labels, noise)
    return float(reconstruction), float(kl)


@torch.no_grad()
def generate(decoder: Decoder, z: torch.Tensor, labels: torch.Tensor, batch_statistics: bool = False) -> torch.Tensor:
    """Pixel probabilities ``(N, 64)`` for codes ``z`` and ``labels``.

    By default the decoder runs in eval mode: BN normalizes with its running
    statistics, so each image depends on its own code and label only. With
    ``batch_statistics=True`` it runs in training mode, BN normalizing with
    the statistics of this batch of ``N``; that runs on a copy, so the
    decoder's running estimates stay as they were.
    """
    if batch_statistics:
        return torch.sigmoid(copy.deepcopy(decoder).train()(z, labels))
    with modes_kept(decoder):  # (each submodule's own mode: a frozen BN stays frozen)
        return torch.sigmoid(decoder.eval()(z, labels))


def one_class_batches(decoder: Decoder, z: torch.Tensor) -> torch.Tensor:
    """Images ``(10, N, 64)``: row ``k`` is :func:`generate` of the codes ``z`` (``(N, latent)``),
    all labelled ``k``, in one batch with BN's batch statistics, as a sampler asking for
    "a batch of sevens" would run it."""
    return torch.stack([generate(decoder, z, torch.full((len(z),), k), batch_statistics=True)
                        for k in range(NUM_CLASSES)])
