"""The masking-noise kernel on CPU: the C++ kernel equals the torch reference bit for bit, the
noise is a pure function of (seed, step, global sample index, position), its statistics match
docs/method.md ("Noise"), and bad arguments fail with clear messages."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from megatron_nbdiff.noise import NoiseOutput, _extensions, available_backends, mask_tokens, philox4x32_10

T_MODES = ("per_block", "per_sequence")
T_SAMPLINGS = ("uniform", "antithetic", "stratified")

# Random123's published known-answer vectors for Philox-4x32-10: counter, key, output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def _assert_same(a: NoiseOutput, b: NoiseOutput) -> None:
    for name, x, y in zip(NoiseOutput._fields, a, b):
        assert x.dtype == y.dtype, f"{name}: dtype {x.dtype} != {y.dtype}"
        assert x.shape == y.shape, f"{name}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        assert torch.equal(x, y), f"{name} differs at {int((x != y).sum())} positions"


def _noise(tokens: torch.Tensor, **kwargs) -> NoiseOutput:
    args = dict(block_size=8, mask_token_id=99, seed=1234, step=0, sample_index=0)
    args.update(kwargs)
    return mask_tokens(tokens, **args)


def _tokens(rows: int, length: int, dtype: torch.dtype = torch.int64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 99, (rows, length), generator=gen).to(dtype)


# ---------------------------------------------------------------------------------------------
# Philox and the build


def test_cpp_extension_is_built() -> None:
    """setup.py builds the C++ kernel on every install; the rest of this file relies on it."""
    assert "cpp" in available_backends(), (
        "megatron_nbdiff._noise_cpu did not import "
        f"({_extensions.load_failure(_extensions.CPU_EXTENSION)}); "
        "run `pip install --no-build-isolation -e .`"
    )


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected) -> None:
    words = philox4x32_10(*(torch.tensor([c], dtype=torch.int64) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected
    ext = _extensions.load_extension(_extensions.CPU_EXTENSION)
    assert tuple(ext.philox4x32_10(*counter, *key)) == expected


def test_torch_philox_matches_cpp_on_random_counters() -> None:
    gen = torch.Generator().manual_seed(7)
    counters = torch.randint(0, 2**32, (4, 64), generator=gen, dtype=torch.int64)
    key = (0x9E3779B9, 0xFFFFFFFF)
    words = torch.stack(philox4x32_10(*counters, *key))
    ext = _extensions.load_extension(_extensions.CPU_EXTENSION)
    for j in range(counters.shape[1]):
        assert tuple(int(w) for w in words[:, j]) == tuple(ext.philox4x32_10(*counters[:, j].tolist(), *key))


# ---------------------------------------------------------------------------------------------
# C++ kernel == torch reference


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("t_mode,t_sampling", list(itertools.product(T_MODES, T_SAMPLINGS)))
@pytest.mark.parametrize(
    "rows,length,block_size",
    [(1, 1, 1), (3, 12, 4), (2, 7, 7), (5, 30, 3), (4, 64, 1), (6, 40, 8), (3, 8200, 41)],
)
def test_cpp_equals_reference_grid(dtype, t_mode, t_sampling, rows, length, block_size) -> None:
    tokens = _tokens(rows, length, dtype)
    loss_mask = torch.rand(rows, length, generator=torch.Generator().manual_seed(1)) > 0.2
    for weight_mode, keep_first, mask in [("one", True, None), ("inv_t", False, loss_mask)]:
        kwargs = dict(
            block_size=block_size,
            mask_token_id=7,
            seed=2**63 + 5,
            step=11,
            sample_index=torch.tensor([3, 0, 17, 2**40 + 1, 9, 4][:rows]),
            loss_mask=mask,
            t_mode=t_mode,
            t_sampling=t_sampling,
            weight_mode=weight_mode,
            keep_block_first=keep_first,
            strata=3,
        )
        expected = mask_tokens(tokens, backend="torch", **kwargs)
        _assert_same(mask_tokens(tokens, backend="cpp", **kwargs), expected)


@st.composite
def _noise_case(draw):
    rows = draw(st.integers(0, 6))
    block_size = draw(st.integers(1, 12))
    length = block_size * draw(st.integers(0, 12))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    tokens = torch.randint(0, 2**31 - 1, (rows, length), generator=gen).to(dtype)
    mask_kind = draw(st.sampled_from(["none", "bool", "int"]))
    loss_mask = None
    if mask_kind != "none":
        loss_mask = torch.rand(rows, length, generator=gen) > draw(st.floats(0.0, 1.0))
        if mask_kind == "int":
            loss_mask = loss_mask.to(torch.int32) * draw(st.integers(1, 5))
    if draw(st.booleans()):
        sample_index = draw(st.integers(0, 2**56 - 1 - rows))
    else:
        indices = draw(st.lists(st.integers(0, 2**56 - 1), min_size=rows, max_size=rows))
        sample_index = torch.tensor(indices, dtype=torch.int64)
    kwargs = dict(
        block_size=block_size,
        mask_token_id=draw(st.integers(0, 2**31 - 1)),
        seed=draw(st.integers(0, 2**64 - 1)),
        step=draw(st.integers(0, 2**32 - 1)),
        sample_index=sample_index,
        loss_mask=loss_mask,
        t_mode=draw(st.sampled_from(T_MODES)),
        t_sampling=draw(st.sampled_from(T_SAMPLINGS)),
        eps=draw(st.sampled_from([1e-3, 0.5, 1e-30, 0.999999])),
        keep_block_first=draw(st.booleans()),
        weight_mode=draw(st.sampled_from(["one", "inv_t"])),
        strata=draw(st.integers(1, 20)),
    )
    return tokens, kwargs


@settings(max_examples=150, deadline=None, derandomize=True)
@given(_noise_case())
def test_cpp_equals_reference_random(case) -> None:
    tokens, kwargs = case
    _assert_same(mask_tokens(tokens, backend="torch", **kwargs), mask_tokens(tokens, backend="cpp", **kwargs))


def test_cpp_thread_count_and_layout_do_not_change_bits() -> None:
    tokens = _tokens(5, 9000 * 4, seed=3)[:, ::4]  # non-contiguous view: [5, 9000]
    reference = _noise(tokens.contiguous(), block_size=9, backend="torch")
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            _assert_same(_noise(tokens, block_size=9, backend="cpp"), reference)
    finally:
        torch.set_num_threads(threads)


def test_auto_backend_is_cpp_on_cpu_and_agrees() -> None:
    tokens = _tokens(4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the extension is built: no fallback warning
        auto = _noise(tokens, backend="auto")
    _assert_same(auto, _noise(tokens, backend="torch"))


# ---------------------------------------------------------------------------------------------
# Pure function of (seed, step, global sample index, position)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("t_mode,t_sampling", list(itertools.product(T_MODES, T_SAMPLINGS)))
def test_layout_invariance(backend, t_mode, t_sampling) -> None:
    tokens = _tokens(8, 64, seed=5)
    kw = dict(block_size=8, t_mode=t_mode, t_sampling=t_sampling, backend=backend, step=3, strata=4)
    one_rank = _noise(tokens, sample_index=0, **kw)
    # Second of two data-parallel ranks: rows 4..7 with their global indices.
    rank1 = _noise(tokens[4:], sample_index=torch.arange(4, 8), **kw)
    rank1_int = _noise(tokens[4:], sample_index=4, **kw)
    for field in NoiseOutput._fields:
        assert torch.equal(getattr(one_rank, field)[4:], getattr(rank1, field)), field
    _assert_same(rank1, rank1_int)
    # Rows in another order (another sampler layout): each row keeps its noise.
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    shuffled = _noise(tokens[perm], sample_index=perm, **kw)
    for field in NoiseOutput._fields:
        assert torch.equal(getattr(one_rank, field)[perm], getattr(shuffled, field)), field
    # Resume: a fresh call at the same step gives the same noise; another step does not.
    _assert_same(_noise(tokens, sample_index=0, **kw), one_rank)
    other = _noise(tokens, sample_index=0, **{**kw, "step": 4})
    assert not torch.equal(other.t, one_rank.t)
    assert not torch.equal(other.is_masked, one_rank.is_masked)
    other_seed = _noise(tokens, sample_index=0, seed=1235, **kw)
    assert not torch.equal(other_seed.is_masked, one_rank.is_masked)


def test_noise_does_not_depend_on_token_values() -> None:
    a = _noise(_tokens(4, 32, seed=1))
    b = _noise(_tokens(4, 32, seed=2))
    assert torch.equal(a.is_masked, b.is_masked) and torch.equal(a.t, b.t)


# ---------------------------------------------------------------------------------------------
# Semantics


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_outputs_block_first_and_loss_mask(backend) -> None:
    rows, length, block = 16, 128, 8
    tokens = _tokens(rows, length, torch.int32)
    loss_mask = torch.ones(rows, length, dtype=torch.bool)
    loss_mask[:, :20] = False  # a prompt
    loss_mask[3, 100:] = False  # padding
    out = _noise(tokens, block_size=block, loss_mask=loss_mask, eps=0.9, backend=backend, mask_token_id=123)
    assert out.noisy_ids.dtype == torch.int32 and out.is_masked.dtype == torch.bool
    assert out.t.dtype == torch.float32 and out.weight.dtype == torch.float32
    assert not out.is_masked[:, ::block].any(), "a block's first token was masked"
    assert not out.is_masked[~loss_mask].any(), "a token without loss was masked"
    eligible = loss_mask.clone()
    eligible[:, ::block] = False
    assert out.is_masked[eligible].float().mean() > 0.85  # t >= 0.9: the checks above bite
    mask_id = torch.tensor(123, dtype=torch.int32)
    assert torch.equal(out.noisy_ids, torch.where(out.is_masked, mask_id, tokens))
    assert torch.equal(out.weight, out.is_masked.float())
    assert torch.equal(out.weight[~loss_mask], torch.zeros(int((~loss_mask).sum())))
    # t is the block's t on every token of the block, loss or not.
    t_blocks = out.t.reshape(rows, length // block, block)
    assert torch.equal(t_blocks, t_blocks[:, :, :1].expand_as(t_blocks))
    assert len(torch.unique(t_blocks[:, :, 0])) == rows * length // block


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_keep_block_first_off_masks_first_tokens(backend) -> None:
    out = _noise(_tokens(16, 64), block_size=8, keep_block_first=False, eps=0.9, backend=backend)
    assert out.is_masked[:, ::8].float().mean() > 0.85


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_per_sequence_one_t_per_row(backend) -> None:
    tokens = _tokens(6, 96)
    out = _noise(tokens, t_mode="per_sequence", block_size=None, backend=backend)
    assert torch.equal(out.t, out.t[:, :1].expand_as(out.t))
    assert len(torch.unique(out.t[:, 0])) == 6
    assert not out.is_masked[:, 0].any()
    _assert_same(out, _noise(tokens, t_mode="per_sequence", block_size=96, backend=backend))
    # block_size only chooses the kept block-first tokens; t and the other decisions stay.
    by_block = _noise(tokens, t_mode="per_sequence", block_size=8, backend=backend)
    assert torch.equal(by_block.t, out.t)
    keep = torch.ones(96, dtype=torch.bool)
    keep[::8] = False
    assert torch.equal(by_block.is_masked[:, keep], out.is_masked[:, keep])
    assert not by_block.is_masked[:, ::8].any()


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_inv_t_weight(backend) -> None:
    out = _noise(_tokens(8, 64), weight_mode="inv_t", backend=backend)
    expected = torch.where(out.is_masked, 1.0 / out.t, torch.zeros_like(out.t))
    assert torch.equal(out.weight, expected)
    assert out.is_masked.any()


def test_integer_loss_mask_equals_bool() -> None:
    tokens = _tokens(4, 32)
    lm = torch.rand(4, 32, generator=torch.Generator().manual_seed(2)) > 0.5
    _assert_same(_noise(tokens, loss_mask=lm), _noise(tokens, loss_mask=lm.to(torch.int64) * 3))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("shape", [(0, 16), (3, 0)])
def test_empty_inputs(backend, shape) -> None:
    out = _noise(torch.zeros(shape, dtype=torch.int64), backend=backend)
    assert all(x.shape == shape for x in out)


# ---------------------------------------------------------------------------------------------
# Statistics (deterministic seeds: these pass for a correct kernel and fail for a biased one)


def test_masked_fraction_matches_t() -> None:
    rows, block = 64, 256
    out = _noise(_tokens(rows, block * 16), block_size=block, keep_block_first=False, seed=99)
    t = out.t[:, ::block].double().flatten()  # one t per block
    k = out.is_masked.reshape(-1, block).sum(dim=1).double()
    z = (k - block * t).sum() / (block * t * (1 - t)).sum().sqrt()
    assert abs(z) < 4.0, f"masked counts disagree with t: z = {z:.2f}"
    lo = torch.tensor(stats.binom.ppf(0.0005, block, t.numpy()))
    hi = torch.tensor(stats.binom.ppf(0.9995, block, t.numpy()))
    outside = ((k < lo) | (k > hi)).float().mean()
    assert outside < 0.01, f"{outside:.3%} of blocks outside their 99.9% binomial interval"


@pytest.mark.parametrize("t_sampling", T_SAMPLINGS)
def test_t_is_uniform_on_eps_1(t_sampling) -> None:
    eps = 0.05
    out = _noise(_tokens(64, 512), block_size=4, eps=eps, t_sampling=t_sampling, seed=5)
    t = out.t[:, ::4].flatten().double()
    assert t.min() >= torch.tensor(eps, dtype=torch.float32).item() and t.max() <= 1.0
    result = stats.kstest(t.numpy(), stats.uniform(loc=eps, scale=1 - eps).cdf)
    assert result.pvalue > 1e-3, f"t not uniform on [eps, 1]: KS p = {result.pvalue:.2e}"


def test_stratified_t_of_one_sample_is_uniform_across_steps() -> None:
    """The random rotation of strata keeps each sample's t marginally U(eps, 1)."""
    tokens = _tokens(8, 8)
    kw = dict(t_mode="per_sequence", block_size=None, t_sampling="stratified")
    t = torch.stack([_noise(tokens, step=s, **kw).t[3, 0] for s in range(400)]).double()
    assert stats.kstest(t.numpy(), stats.uniform(loc=1e-3, scale=1 - 1e-3).cdf).pvalue > 1e-3


def test_antithetic_and_stratified_reduce_variance_of_batch_mean() -> None:
    tokens = _tokens(8, 64)
    variances = {}
    for t_sampling in T_SAMPLINGS:
        # The batch mean of t, per (step, block): 100 steps x 8 blocks.
        t = torch.stack([_noise(tokens, t_sampling=t_sampling, step=s, seed=17).t for s in range(100)])
        variances[t_sampling] = t[:, :, ::8].double().mean(dim=1).var().item()
    uniform_var = (1 - 1e-3) ** 2 / 12 / 8  # Var(U(eps, 1)) / batch
    assert 0.8 * uniform_var < variances["uniform"] < 1.25 * uniform_var, variances
    # Antithetic: each pair's mean is constant. Stratified: 1/G^2 = 1/64 of the uniform variance.
    assert variances["antithetic"] < 1e-6 * variances["uniform"], variances
    assert variances["stratified"] < 0.05 * variances["uniform"], variances


def test_antithetic_pairs_mirror() -> None:
    index = torch.tensor([10, 11, 3, 2, 7, 6])
    out = _noise(_tokens(6, 16), t_sampling="antithetic", sample_index=index, eps=1e-3)
    u = (out.t[:, ::8].double() - out.t.new_tensor(1e-3).double()) / (1 - 1e-3)
    for a, b in [(0, 1), (2, 3), (4, 5)]:
        assert torch.allclose(u[a] + u[b], torch.ones_like(u[a]), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Fallback warning


def test_missing_extension_falls_back_with_one_warning(monkeypatch) -> None:
    tokens = _tokens(4, 32)
    expected = _noise(tokens, backend="cpp")
    real = _extensions.load_extension
    monkeypatch.setattr(
        _extensions, "load_extension", lambda name: None if name == _extensions.CPU_EXTENSION else real(name)
    )
    monkeypatch.setattr(_extensions, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _noise(tokens, backend="auto")
        second = _noise(tokens, backend="auto")
    fallback = [w for w in caught if "falling back to the pure-torch reference" in str(w.message)]
    assert len(fallback) == 1 and fallback[0].category is RuntimeWarning
    assert fallback[0].filename == __file__  # points at the caller
    _assert_same(first, expected)
    _assert_same(second, expected)
    with pytest.raises(RuntimeError, match=r"backend='cpp' was requested but .*_noise_cpu is not available"):
        _noise(tokens, backend="cpp")


# ---------------------------------------------------------------------------------------------
# Bad input


_I64 = torch.zeros(2, 8, dtype=torch.int64)
_BAD_INPUTS = [
    # (tokens, extra kwargs, exception, message pattern)
    (torch.zeros(2, 8), {}, TypeError, r"tokens must be an int32 or int64 tensor, found dtype torch\.float32"),
    ([[1, 2]], {}, TypeError, r"tokens must be a torch\.Tensor, found list"),
    (_I64[0], {}, ValueError, r"tokens must have shape \[batch, length\], found shape \(8,\)"),
    (torch.zeros(2, 12, dtype=torch.int64), {}, ValueError, r"block_size 8 does not divide the sequence length 12"),
    (_I64, {"block_size": 0}, ValueError, r"block_size must be >= 1, found 0"),
    (_I64, {"block_size": 2.0}, TypeError, r"block_size must be an int, found float"),
    (_I64, {"block_size": None}, ValueError, r"block_size=None .* needs t_mode='per_sequence'"),
    (_I64, {"mask_token_id": -1}, ValueError, r"mask_token_id must be >= 0, found -1"),
    (
        _I64,
        {"mask_token_id": 100, "vocab_size": 100},
        ValueError,
        r"mask_token_id 100 is outside the vocabulary: expected 0 <= mask_token_id < vocab_size = 100",
    ),
    (_I64.int(), {"mask_token_id": 2**31}, ValueError, r"does not fit the int32 tokens"),
    (torch.tensor([[1, -3, 2, 0, 1, 1, 1, 1]]), {}, ValueError, r"tokens must be non-negative ids, found min id -3"),
    (torch.full((1, 8), 100), {"vocab_size": 100}, ValueError, r"tokens must be < vocab_size = 100, found max id 100"),
    (
        _I64,
        {"loss_mask": torch.ones(2, 8)},
        TypeError,
        r"loss_mask must be a bool or integer tensor, found dtype torch\.float32",
    ),
    (
        _I64,
        {"loss_mask": torch.ones(2, 4, dtype=torch.bool)},
        ValueError,
        r"loss_mask must have the shape of tokens \(2, 8\), found \(2, 4\)",
    ),
    (
        _I64,
        {"loss_mask": torch.ones(2, 8, dtype=torch.bool, device="meta")},
        ValueError,
        r"loss_mask is on meta but tokens are on cpu",
    ),
    (_I64, {"sample_index": torch.arange(2, device="meta")}, ValueError, r"sample_index is on meta but tokens are"),
    (_I64, {"sample_index": torch.arange(3)}, ValueError, r"sample_index must have shape \[batch\] = \(2,\), found"),
    (_I64, {"sample_index": torch.zeros(2)}, TypeError, r"sample_index must be an integer tensor"),
    (_I64, {"sample_index": torch.tensor([0, -1])}, ValueError,
     r"sample_index values must be in \[0, 2\^56\), found min"),
    (_I64, {"sample_index": -4}, ValueError, r"sample_index .* found -4"),
    (_I64, {"backend": "cuda"}, ValueError, r"backend='cuda' needs CUDA tensors, but tokens are on cpu"),
    (_I64, {"backend": "gpu"}, ValueError, r"unknown backend 'gpu': expected one of 'auto', 'cpp', 'cuda', 'torch'"),
    (_I64, {"t_mode": "per_token"}, ValueError, r"unknown t_mode 'per_token': expected one of 'per_block', 'per_seq"),
    (_I64, {"t_sampling": "sobol"}, ValueError, r"unknown t_sampling 'sobol': expected one of 'uniform', 'antithetic'"),
    (_I64, {"weight_mode": "elbo"}, ValueError, r"unknown weight_mode 'elbo': expected one of 'one', 'inv_t'"),
    (_I64, {"eps": 0.0}, ValueError, r"eps must be in \(0, 1\), found 0\.0"),
    (_I64, {"eps": 1.0}, ValueError, r"eps must be in \(0, 1\), found 1\.0"),
    (_I64, {"eps": 1e-40}, ValueError, r"rounded to float32, in \[1e-30, 1\)"),
    (_I64, {"eps": 1 - 1e-9}, ValueError, r"rounded to float32, in \[1e-30, 1\)"),
    (_I64, {"seed": -1}, ValueError, r"seed must be in \[0, 18446744073709551616\), found -1"),
    (_I64, {"step": 2**32}, ValueError, r"step must be in \[0, 4294967296\), found 4294967296"),
    (_I64, {"strata": 0}, ValueError, r"strata must be in \[1, 65536\], found 0"),
    (_I64, {"keep_block_first": 1}, TypeError, r"keep_block_first must be a bool"),
]


@pytest.mark.parametrize("tokens,kwargs,error,match", _BAD_INPUTS)
def test_bad_input_raises_clear_error(tokens, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        _noise(tokens, **kwargs)


def test_cpp_backend_rejects_non_cpu_tensors() -> None:
    with pytest.raises(ValueError, match=r"backend='cpp' needs CPU tensors, but tokens are on meta"):
        _noise(torch.zeros(2, 8, dtype=torch.int64, device="meta"), backend="cpp", validate=False)
