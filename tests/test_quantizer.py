"""ProgressiveQuantizer: shapes, the shared hard-assignment rule, encode/decode, k-means."""

import numpy as np
import pytest
import torch

from dpq.config import QuantizerConfig
from dpq.model.quantizer import ProgressiveQuantizer, QuantizerOutput


def numpy_greedy_encode(x: np.ndarray, codebooks: np.ndarray, rule: str) -> np.ndarray:
    """Reference: x_1 = x; code_l = argmin ||x_l - C_l[k]||^2 (or argmax cosine);
    x_{l+1} = x_l - C_l[code_l]. One item at a time, float64."""
    codes = np.zeros((len(x), len(codebooks)), dtype=np.int64)
    for i, item in enumerate(x.astype(np.float64)):
        residual = item.copy()
        for level, book in enumerate(codebooks.astype(np.float64)):
            if rule == "euclidean":
                code = int(np.argmin(((residual[None, :] - book) ** 2).sum(1)))
            else:
                cos = book @ residual / (np.linalg.norm(book, axis=1) * np.linalg.norm(residual))
                code = int(np.argmax(cos))
            codes[i, level] = code
            residual = residual - book[code]
    return codes


@pytest.fixture
def features() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(64, 12, generator=generator)


def make_quantizer(**kwargs) -> ProgressiveQuantizer:
    torch.manual_seed(1)
    options = {"num_levels": 3, "codebook_size": 8, "dim": 12, "temperature": 0.5}
    options.update(kwargs)
    quantizer = ProgressiveQuantizer(**options)
    with torch.no_grad():  # codewords at the scale of the data, so every level matters
        quantizer.codebooks.normal_(0, 0.7)
    return quantizer


@pytest.mark.parametrize("similarity", ["euclidean", "cosine"])
@pytest.mark.parametrize("assignment", ["euclidean", "cosine"])
@pytest.mark.parametrize("residual", ["hard", "soft"])
def test_forward_returns_one_result_type_and_the_shared_codes(
    features, similarity, assignment, residual
):
    quantizer = make_quantizer(similarity=similarity, assignment=assignment, residual=residual)
    out = quantizer(features)
    assert isinstance(out, QuantizerOutput)
    assert out.soft.shape == (64, 3, 12) and out.soft.dtype == torch.float32
    assert out.hard.shape == (64, 3, 12)
    assert out.codes.shape == (64, 3) and out.codes.dtype == torch.int64
    expected = numpy_greedy_encode(
        features.numpy(), quantizer.codebooks.detach().numpy(), assignment
    )
    np.testing.assert_array_equal(out.codes.numpy(), expected)
    books = quantizer.codebooks.detach()
    for level in range(3):
        torch.testing.assert_close(out.hard[:, level], books[level][out.codes[:, level]])


def test_encode_matches_forward_and_prefixes(features):
    quantizer = make_quantizer()
    codes = quantizer.encode(features)
    torch.testing.assert_close(codes, quantizer(features).codes)
    for levels in (1, 2):
        torch.testing.assert_close(quantizer.encode(features, num_levels=levels), codes[:, :levels])


def test_decode_is_the_sum_of_the_chosen_codewords(features):
    quantizer = make_quantizer()
    codes = quantizer.encode(features)
    books = quantizer.codebooks.detach().numpy()
    expected = sum(books[level][codes[:, level].numpy()] for level in range(3))
    np.testing.assert_allclose(quantizer.decode(codes).numpy(), expected, rtol=1e-5, atol=1e-6)
    prefix = quantizer.decode(codes[:, :1]).numpy()
    np.testing.assert_allclose(prefix, books[0][codes[:, 0].numpy()], rtol=1e-6)


def test_greedy_levels_reduce_the_reconstruction_error(features):
    quantizer = make_quantizer(codebook_size=16)
    quantizer.init_kmeans(features, iterations=10)
    codes = quantizer.encode(features)
    errors = [
        float(((features - quantizer.decode(codes[:, :levels])) ** 2).sum(1).mean())
        for levels in (1, 2, 3)
    ]
    assert errors[0] > errors[1] > errors[2]


def test_codes_match_the_index_encoder(features):
    from dpq.index import DPQIndex

    quantizer = make_quantizer()
    index = DPQIndex(quantizer.codebooks.detach().numpy())
    np.testing.assert_array_equal(
        index.encode(features.numpy()).astype(np.int64), quantizer.encode(features).numpy()
    )


def test_small_temperature_makes_soft_equal_hard(features):
    quantizer = make_quantizer(temperature=1e-6)
    out = quantizer(features)
    torch.testing.assert_close(out.soft, out.hard, rtol=1e-4, atol=1e-4)


def test_soft_residual_changes_soft_inputs_but_not_codes(features):
    hard_chain = make_quantizer(residual="hard")
    soft_chain = make_quantizer(residual="soft")
    a, b = hard_chain(features), soft_chain(features)
    torch.testing.assert_close(a.codes, b.codes)
    torch.testing.assert_close(a.soft[:, 0], b.soft[:, 0])
    assert not torch.allclose(a.soft[:, 1], b.soft[:, 1])


def test_gradients_reach_codebooks_and_input(features):
    quantizer = make_quantizer()
    x = features.clone().requires_grad_(True)
    out = quantizer(x)
    (out.soft.sum() + (x[:, None] - out.hard.cumsum(1)).pow(2).sum()).backward()
    assert quantizer.codebooks.grad is not None and quantizer.codebooks.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_kmeans_init_beats_random_codebooks(features):
    quantizer = make_quantizer(codebook_size=16)
    codes = quantizer.encode(features)
    before = float(((features - quantizer.decode(codes)) ** 2).sum(1).mean())
    errors = quantizer.init_kmeans(features.numpy(), iterations=10, seed=0)
    codes = quantizer.encode(features)
    after = float(((features - quantizer.decode(codes)) ** 2).sum(1).mean())
    assert after < before
    assert errors.shape == (3,) and np.all(np.diff(errors) < 0)
    assert after == pytest.approx(errors[-1], rel=1e-4)


def test_from_config_round_trip():
    config = QuantizerConfig(num_levels=2, codebook_size=4, dim=5, assignment="cosine")
    quantizer = ProgressiveQuantizer.from_config(config)
    assert quantizer.codebooks.shape == (2, 4, 5)
    assert quantizer.config == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"codebook_size": 12}, "power of two"),
        ({"num_levels": 0}, "num_levels"),
        ({"similarity": "manhattan"}, "similarity"),
        ({"assignment": "dot"}, "assignment"),
        ({"residual": "none"}, "residual"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProgressiveQuantizer(**{"num_levels": 2, "codebook_size": 8, "dim": 4, **kwargs})


def test_bad_inputs_raise_value_error(features):
    quantizer = make_quantizer()
    with pytest.raises(ValueError, match=r"\(N, 12\)"):
        quantizer(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="num_levels"):
        quantizer.encode(features, num_levels=4)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        quantizer.decode(torch.tensor([[0, 8]]))
    with pytest.raises(ValueError, match="integers"):
        quantizer.decode(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="at least K"):
        quantizer.init_kmeans(features[:5])
