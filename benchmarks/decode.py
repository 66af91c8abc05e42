"""Block decoding cost: one denoising pass over a block against one AR decoding step, and the
decoding loop's own overhead per forward (wall time beyond the model's forwards).

    python benchmarks/decode.py                 # GPU: ~1.1B Llama (random weights), bf16
    python benchmarks/decode.py --size tiny     # CPU smoke run

The model is a transformers Llama with random weights behind the project's HF runner (weights do
not change the cost of a pass; with random weights confidences stay low, so the loop runs about
one pass per token, the worst case for its overhead). For each batch size: a prompt of
``--prompt-len`` tokens is prefilled, then

* ``denoise``: one bidirectional pass of a ``--block-size`` block against the cache (cropped back);
* ``ar step``: one causal pass of one token against the cache (cropped back);
* ``loop``: ``block_decode`` of ``--new-tokens`` tokens at threshold 0.9; every model forward is
  timed (synchronised) and the loop overhead is (wall - forwards) / forwards.

Times are medians of ``--repeats`` runs (loop: of ``--loop-repeats`` decodes).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

SIZES = {
    "1b": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=16,
               num_key_value_heads=4, intermediate_size=5632),
    "tiny": dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_runner(size: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_nbdiff.inference.hf_runner import HFRunner
    from megatron_nbdiff.inference.runner import RunnerInfo

    cfg = LlamaConfig(max_position_embeddings=8192, **SIZES[size])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    info = RunnerInfo(vocab_size=cfg.vocab_size, mask_token_id=cfg.vocab_size - 1, eos_token_ids=(),
                      block_size=32, layout="dual_context_causal", has_metadata=True, source=f"random {size}")
    n_params = sum(p.numel() for p in model.parameters())
    return HFRunner(model, info), n_params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--size", choices=sorted(SIZES), default="1b" if gpu else "tiny")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--loop-repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    from megatron_nbdiff.inference import DecodeOptions, block_decode

    runner, n_params = build_runner(args.size, device, dtype)
    forward_time = [0.0]
    inner = runner._forward

    def timed_forward(*a, **k):
        sync(device)
        t0 = time.perf_counter()
        out = inner(*a, **k)
        sync(device)
        forward_time[0] += time.perf_counter() - t0
        return out

    rows = []
    g = torch.Generator().manual_seed(0)
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = torch.randint(0, runner.info.vocab_size - 1, (b, args.prompt_len), generator=g).tolist()
        runner.prefill(prompts)
        block = torch.full((b, args.block_size), runner.info.mask_token_id, device=device)
        block[:, 0] = 5
        one = torch.full((b, 1), 5, device=device)
        t_denoise = median_time(lambda block=block: runner.denoise(block), device, args.repeats)
        t_ar = median_time(lambda one=one: runner.denoise(one), device, args.repeats)  # 1 token, cache kept as is
        opts = DecodeOptions(threshold=0.9, max_new_tokens=args.new_tokens, stop_at_eos=False)
        block_decode(runner, prompts, opts, args.block_size)  # warm-up
        runner._forward = timed_forward
        walls, fwds, passes = [], [], []
        for _ in range(args.loop_repeats):
            forward_time[0] = 0.0
            sync(device)
            t0 = time.perf_counter()
            res = block_decode(runner, prompts, opts, args.block_size)
            sync(device)
            walls.append(time.perf_counter() - t0)
            fwds.append(forward_time[0])
            passes.append(max(r.stats["forward_passes"] for r in res))
        runner._forward = inner
        i = walls.index(statistics.median(walls))
        overhead = (walls[i] - fwds[i]) / fwds[i]
        rows.append((b, t_denoise, t_ar, walls[i], fwds[i], passes[i], overhead, res[0].stats["tokens_per_forward"]))
    dev = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"# decode, {dev}, {datetime.date.today()}, {args.size} ({n_params / 1e9:.2f}B params), "
          f"{str(dtype).replace('torch.', '')}, prompt {args.prompt_len}, block {args.block_size}, "
          f"median of {args.repeats} (passes) / {args.loop_repeats} (loops)")
    print(f"{'batch':>5} {'denoise ms':>11} {'ar step ms':>11} {'ratio':>6} {'loop s':>8} {'forwards s':>11} "
          f"{'passes':>7} {'overhead':>9} {'tok/fwd':>8}")
    for b, td, ta, wall, fwd, n, ov, tpf in rows:
        print(f"{b:>5} {td * 1e3:>11.2f} {ta * 1e3:>11.2f} {td / ta:>6.2f} {wall:>8.3f} {fwd:>11.3f} "
              f"{n:>7} {ov * 100:>8.1f}% {tpf:>8.2f}")
    print("overhead target: < 5% of forward time")


if __name__ == "__main__":
    main()
