"""Masking noise for diffusion training: noisy ids, mask flags, per-block ``t`` and loss weights.

``mask_tokens(tokens, block_size=..., mask_token_id=..., seed=..., step=..., sample_index=...)``
is the entry point (see :func:`megatron_nbdiff.noise.masking.mask_tokens` for every argument).
Three backends compute the same function and give the same bits: the fused C++ kernel (CPU,
OpenMP), the fused CUDA kernel (both in ``csrc/``) and the pure-torch reference
(``reference.py``). ``backend="auto"`` picks the compiled kernel for the tokens' device and falls
back to the reference, with one warning, when it is not built.

Exact definitions
-----------------
Notation: a batch row holds global sample ``g`` (``sample_index``), ``L`` is the row length,
``B`` the block size, ``p`` a position in ``[0, L)``, ``blk(p) = p // B``. ``>>``, ``&``, ``|``
are on unsigned integers; ``float32(.)`` rounds to nearest-even once.

Random words. Philox-4x32-10 (Random123's constants and rounds), key
``(seed & 0xffffffff, seed >> 32)``, counter ``(c0, c1, c2, c3)`` with::

    words(c0, stream, idx) = Philox(c0, stream | (idx >> 32) << 8, idx & 0xffffffff, step)

so ``0 <= seed < 2^64``, ``0 <= step < 2^32`` and ``0 <= idx < 2^56``. Streams: 0 token
words, 1 uniform t, 2 antithetic t, 3 stratified offset, 4 stratified rotation. Nothing
depends on the batch row, the rank, the device or the parallel layout, only on (seed, step, g,
p): a sample gets the same noise on one rank or another, on CPU or GPU, and before or after a
resume; another step gives other noise. Antithetic pairs and stratified groups are defined on
global sample indices, so their variance reduction shows in any batch that holds whole pairs
or groups (for example micro-batches whose first global index is a multiple of ``G``).

Token words. Token ``p`` of sample ``g`` uses ``r(g, p) = words(p >> 2, 0, g)[p & 3]`` (one
Philox call serves four consecutive tokens) and its 24-bit uniform ``r24 = r >> 8``.

``t``. A t slot is ``s = blk(p)`` for ``t_mode="per_block"`` and ``s = 0`` for
``"per_sequence"`` (one t per row; ``B`` still decides the block-first tokens, and
``block_size=None`` means ``B = L``). The 24-bit integer ``u24(g, s)``:

* ``uniform``: ``u24 = words(s, 1, g)[0] >> 8``.
* ``antithetic``: with ``w = words(s, 2, g >> 1)[0] >> 8``, ``u24 = w`` for even ``g`` and
  ``u24 = 2^24 - 1 - w`` for odd ``g``: samples ``g`` and ``g ^ 1`` mirror each other on the
  2^24-point grid, that is ``u`` and ``1 - 2^-24 - u`` (the grid's ``1 - u``).
* ``stratified`` with ``G = strata`` (default 8): the samples ``G*q .. G*q + G - 1`` (group
  ``q = g // G``) share a rotation ``shift = (words(s, 4, q)[0] * G) >> 32`` (in ``[0, G)``);
  sample ``g`` takes stratum ``k = (g % G + shift) % G`` and its own offset
  ``v = words(s, 3, g)[0] >> 8``, and ``u24 = (k * 2^24 + v) // G`` (integer division), a
  uniform point of ``[k/G, (k+1)/G)``. A full group covers every stratum once, so the variance
  of its mean t is 1/G^2 of the uniform one; the random rotation keeps each sample's t
  marginally uniform, whatever ``g % G`` is.

Then ``u = float32(u24) * 2^-24`` (exact) and, in float32 with exactly two roundings,
``t = float32(eps32 + float32(scale32 * u))`` where ``eps32 = float32(eps)`` and
``scale32 = float32(1 - eps32)``; so ``t`` lies in ``[eps, 1]``. No backend fuses the multiply
and add into an FMA (CUDA uses ``__fmul_rn``/``__fadd_rn``; the C++ kernel rounds the product
through a volatile; torch runs them as two tensor ops). ``eps`` is limited to float32 values
in ``[1e-30, 1)``, so every intermediate (and ``1 / t``) is a normal float32 and flushing
subnormals to zero (``--use_fast_math``) cannot change a bit.

Mask. Token ``p`` is eligible unless its loss mask is 0 or (``keep_block_first``) ``p % B == 0``.
An eligible token is masked iff ``float32(r24) * 2^-24 < t`` (both sides exact float32 values,
so the comparison is exact everywhere); ``P(masked) = ceil(t * 2^24) / 2^24``, which is ``t``
to within 2^-24. ``noisy_ids = mask_token_id`` where masked, the token elsewhere.

Outputs, all shaped like ``tokens``: ``noisy_ids`` (tokens' dtype), ``is_masked`` (bool),
``t`` (float32, the token's slot t, also on unmasked and loss-free tokens) and ``weight``
(float32: ``1`` or, with ``weight_mode="inv_t"``, ``float32(1 / t)`` on masked tokens; 0 on
every other token).
"""

from megatron_nbdiff.noise.masking import BACKENDS, NoiseOutput, available_backends, mask_tokens
from megatron_nbdiff.noise.reference import noise_reference, philox4x32_10

__all__ = [
    "BACKENDS",
    "NoiseOutput",
    "available_backends",
    "mask_tokens",
    "noise_reference",
    "philox4x32_10",
]
