"""Progressive quantization blocks (paper section 2.2): L residual codebooks with a soft
(differentiable) and a hard (nearest codeword) assignment per level.

Block l reads x_l (x_1 = x), computes

- the soft quantization q_l = sum_k softmax_k(s(x_l, c_k) / temperature) c_k (Eq. 14), with
  s the negative squared Euclidean distance or the cosine similarity (Eq. 15);
- the hard quantization q_l^H = C_l[code_l] with the shared assignment rule: code_l =
  argmin_k ||x_l - c_k||^2 ("euclidean", Eq. 26) or argmax_k cos(x_l, c_k) ("cosine",
  reference code);
- the next input x_{l+1} = x_l - q_l^H (reference code).

Codes always follow the greedy hard residual chain above (the shared contract, so the index
encodes features exactly as the model does). ``residual="soft"`` changes only what the
*soft* quantizations read: the chain x_{l+1} = x_l - q_l of Eq. 16.

The first l codes of an item are a valid shorter code: ``encode(x, num_levels=l)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpq.config import QuantizerConfig


@dataclass(frozen=True)
class QuantizerOutput:
    """Result of :meth:`ProgressiveQuantizer.forward`, the same whatever the flags.

    Attributes:
        soft: float32 (N, L, D), soft quantization q_l of each level (Eq. 14).
        hard: float32 (N, L, D), hard codeword q_l^H of each level (Eq. 17); gradients
            reach the codebooks (and, through the residuals, the input).
        codes: int64 (N, L), index of the hard codeword of each level.
    """

    soft: torch.Tensor
    hard: torch.Tensor
    codes: torch.Tensor


def _squared_distances(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, D) x (K, D) -> (N, K) squared Euclidean distances (clamped at 0)."""
    dist = x.pow(2).sum(1, keepdim=True) - 2.0 * x @ codebook.t() + codebook.pow(2).sum(1)[None, :]
    return dist.clamp_min(0.0)


def _cosine(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, D) x (K, D) -> (N, K) cosine similarities (zero vectors give 0)."""
    return F.normalize(x, dim=1, eps=1e-12) @ F.normalize(codebook, dim=1, eps=1e-12).t()


def assign_codes(residual: torch.Tensor, codebook: torch.Tensor, assignment: str) -> torch.Tensor:
    """Hard assignment of one level.

    Args:
        residual: float (N, D), the input x_l of the level.
        codebook: float (K, D).
        assignment: "euclidean" (argmin squared distance) or "cosine" (argmax cosine).

    Returns:
        int64 (N,) codeword indices (ties go to the lowest index).
    """
    if assignment == "euclidean":
        return _squared_distances(residual, codebook).argmin(dim=1)
    if assignment == "cosine":
        return _cosine(residual, codebook).argmax(dim=1)
    raise ValueError(f"assignment must be 'euclidean' or 'cosine'; got {assignment!r}.")


class ProgressiveQuantizer(nn.Module):
    """L progressive quantization blocks with codebooks (L, K, D).

    Args:
        num_levels: L.
        codebook_size: K (a power of two).
        dim: D.
        temperature: soft assignment is softmax(s / temperature) (gamma = 1 / temperature).
        similarity: "euclidean" or "cosine", s of the soft assignment.
        assignment: "euclidean" or "cosine", rule of the hard assignment (codes).
        residual: "hard" or "soft": what is subtracted before the next level in the chain
            the soft quantizations read (codes always use the hard chain).
        init_std: standard deviation of the normal initialisation of the codebooks.
    """

    def __init__(
        self,
        num_levels: int = 4,
        codebook_size: int = 256,
        dim: int = 300,
        temperature: float = 1.0,
        similarity: str = "euclidean",
        assignment: str = "euclidean",
        residual: str = "hard",
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        # Validates every argument with the config's sentences.
        self.config = QuantizerConfig(
            num_levels=num_levels,
            codebook_size=codebook_size,
            dim=dim,
            temperature=temperature,
            similarity=similarity,
            assignment=assignment,
            residual=residual,
        )
        self.num_levels = num_levels
        self.codebook_size = codebook_size
        self.dim = dim
        self.temperature = float(temperature)
        self.similarity = similarity
        self.assignment = assignment
        self.residual = residual
        self.codebooks = nn.Parameter(torch.randn(num_levels, codebook_size, dim) * init_std)

    @classmethod
    def from_config(cls, config: QuantizerConfig) -> ProgressiveQuantizer:
        """Build from a :class:`~dpq.config.QuantizerConfig`."""
        return cls(
            num_levels=config.num_levels,
            codebook_size=config.codebook_size,
            dim=config.dim,
            temperature=config.temperature,
            similarity=config.similarity,
            assignment=config.assignment,
            residual=config.residual,
        )

    def _check_features(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must have shape (N, {self.dim}); got {tuple(x.shape)}.")

    def _soft_weights(self, residual: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        if self.similarity == "euclidean":
            scores = -_squared_distances(residual, codebook)
        else:
            scores = _cosine(residual, codebook)
        return torch.softmax(scores / self.temperature, dim=1)

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        """Quantize features level by level.

        Args:
            x: float32 (N, D) features.

        Returns:
            :class:`QuantizerOutput` with soft (N, L, D), hard (N, L, D), codes (N, L).
        """
        self._check_features(x)
        hard_residual = x
        soft_residual = x
        soft_levels, hard_levels, code_levels = [], [], []
        for level in range(self.num_levels):
            codebook = self.codebooks[level]
            with torch.no_grad():
                codes = assign_codes(hard_residual.detach(), codebook.detach(), self.assignment)
            hard = codebook[codes]
            soft_input = hard_residual if self.residual == "hard" else soft_residual
            soft = self._soft_weights(soft_input, codebook) @ codebook
            hard_residual = hard_residual - hard
            if self.residual == "soft":
                soft_residual = soft_residual - soft
            soft_levels.append(soft)
            hard_levels.append(hard)
            code_levels.append(codes)
        return QuantizerOutput(
            soft=torch.stack(soft_levels, dim=1),
            hard=torch.stack(hard_levels, dim=1),
            codes=torch.stack(code_levels, dim=1),
        )

    def _levels(self, num_levels: int | None) -> int:
        if num_levels is None:
            return self.num_levels
        if isinstance(num_levels, bool) or not isinstance(num_levels, int | np.integer):
            raise ValueError(f"num_levels must be an integer; got {num_levels!r}.")
        if not 1 <= num_levels <= self.num_levels:
            raise ValueError(
                f"num_levels must be between 1 and {self.num_levels} (the model's L); "
                f"got {num_levels}."
            )
        return int(num_levels)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, num_levels: int | None = None) -> torch.Tensor:
        """Hard codes of the first ``num_levels`` levels (greedy residual assignment, the
        same codes as :meth:`forward`).

        Args:
            x: float (N, D) features.
            num_levels: l <= L (default L).

        Returns:
            int64 (N, l) codes.
        """
        self._check_features(x)
        levels = self._levels(num_levels)
        residual = x.float()
        codebooks = self.codebooks.detach().float()
        out = torch.empty(x.shape[0], levels, dtype=torch.int64, device=x.device)
        for level in range(levels):
            codes = assign_codes(residual, codebooks[level], self.assignment)
            out[:, level] = codes
            residual = residual - codebooks[level][codes]
        return out

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction sum_l C_l[codes[:, l]] from the first l levels.

        Args:
            codes: integer (N, l) codes, l <= L.

        Returns:
            float32 (N, D).
        """
        codes = torch.as_tensor(codes)
        if codes.ndim != 2 or not 1 <= codes.shape[1] <= self.num_levels:
            raise ValueError(
                f"codes must have shape (N, l) with 1 <= l <= {self.num_levels}; "
                f"got {tuple(codes.shape)}."
            )
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers; got dtype {codes.dtype}.")
        codes = codes.long()
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size - 1}]; got values in "
                f"[{int(codes.min())}, {int(codes.max())}]."
            )
        levels = torch.arange(codes.shape[1], device=codes.device)
        return self.codebooks.detach()[levels[None, :], codes].sum(dim=1)

    @torch.no_grad()
    def init_kmeans(
        self, features: torch.Tensor | np.ndarray, iterations: int = 20, seed: int = 0
    ) -> np.ndarray:
        """Initialise the codebooks by residual k-means (faiss: random init + Lloyd).

        Level l runs k-means on the hard residuals left by levels 1..l-1 (formed with this
        quantizer's assignment rule), so the codebooks start as a residual quantizer of the
        given features.

        Args:
            features: float (N, D) features, N >= K.
            iterations: Lloyd iterations per level.
            seed: k-means seed.

        Returns:
            float64 (L,) mean squared reconstruction error after each level.
        """
        import faiss

        data = (
            features.detach().float().cpu().numpy()
            if isinstance(features, torch.Tensor)
            else np.asarray(features, dtype=np.float32)
        )
        data = np.ascontiguousarray(data, dtype=np.float32)
        if data.ndim != 2 or data.shape[1] != self.dim:
            raise ValueError(f"features must have shape (N, {self.dim}); got {data.shape}.")
        if data.shape[0] < self.codebook_size:
            raise ValueError(
                f"k-means initialisation needs at least K = {self.codebook_size} feature "
                f"vectors; got {data.shape[0]}. Use more training images or a smaller "
                f"codebook_size, or init='normal'."
            )
        if not np.isfinite(data).all():
            raise ValueError("features for the k-means initialisation contain NaN or inf.")
        residual = torch.from_numpy(data.copy())
        errors = np.zeros(self.num_levels)
        new_codebooks = torch.empty_like(self.codebooks.data, device="cpu")
        for level in range(self.num_levels):
            kmeans = faiss.Kmeans(
                self.dim,
                self.codebook_size,
                niter=iterations,
                seed=seed + level,
                max_points_per_centroid=1_000_000,
                min_points_per_centroid=1,
                verbose=False,
            )
            kmeans.train(np.ascontiguousarray(residual.numpy()))
            codebook = torch.from_numpy(np.asarray(kmeans.centroids, dtype=np.float32))
            new_codebooks[level] = codebook
            codes = assign_codes(residual, codebook, self.assignment)
            residual = residual - codebook[codes]
            errors[level] = float(residual.pow(2).sum(1).mean())
        self.codebooks.data.copy_(new_codebooks.to(self.codebooks.device))
        return errors
