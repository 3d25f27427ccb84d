"""Forward speed of the rank-wise MoE-LoRA layer against its baselines, on CPU, printed as ratios to base.

Layer level (one target projection, ``hidden x hidden``, E experts of rank r, token routing):

  base            the projection alone
  moe (ours)      MoeLoraLinear + its router (the router normally serves all modules of a decoder layer,
                  here it is charged to one module: conservative); "moe module only" leaves the router out
  lora R          one plain LoRA of total rank R = E*r: PEFT's LoRA Linear, and a hand-written minimum
  naive loop      base + sum_i pi_i s_i B_i A_i x, a Python loop over the E experts
  peft multi      PEFT LoRA Linear with E active adapters (its multi-adapter path: a loop, no gating)

Overhead = time - base time. Targets: ours <= 1.15x the overhead of PEFT's LoRA of rank R, and
>= 3x smaller than the naive loop's overhead.

Model level (``--model``): a randomly initialised model with SmolLM2-135M's shape, E experts of rank r
on all attention and MLP projections, against the same model with one merged LoRA (= the base cost)
and with one unmerged PEFT LoRA of the same total rank.

    python benchmarks/moe_forward.py                 # quick, small sizes
    python benchmarks/moe_forward.py --full --model  # hidden 2048, 8 x rank 16, 2048 tokens; 135M model

Measured (--full, 1 thread, thread CPU clock, a shared 2-core x86 VM under load; overheads are
+-15% from run to run there):

  layer fp32   ours 1.150x base, PEFT LoRA r128 1.181x, plain LoRA 1.141x, loop 1.482x, PEFT 8 adapters 1.451x
               overhead ours / PEFT LoRA = 0.83 (other runs 0.76-0.98), loop / ours = 3.2 (other runs 2.5-4.4)
  layer bf16   ours 1.144x, PEFT LoRA 1.319x, loop 1.728x: ours / PEFT LoRA = 0.45, loop / ours = 5.0
  model fp32   135M shape, 4 x r16 on all 7 projections, 512 tokens: ours 1.167x base (token routing),
               1.165x (sequence), PEFT LoRA r64 unmerged 1.193x; one merged LoRA = the base, 1.000x
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergekit_moe.moe.layer import LayerRouter, MoeLoraLinear, RoutingState  # noqa: E402
from mergekit_moe.moe.spec import Routing  # noqa: E402


CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = time.perf_counter


def timeit(fns: dict, x, *, rounds: int, reps: int) -> dict[str, float]:
    """Best-of-rounds seconds per call (timeit's advice: background load only ever adds time).

    Variants are interleaved round by round so slow phases of a shared machine hit all of them alike.
    """
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for f in fns.values():  # warm-up
            f(x)
            f(x)
        for _ in range(rounds):
            for k, f in fns.items():
                t0 = _clock()
                for _ in range(reps):
                    f(x)
                times[k].append((_clock() - t0) / reps)
    return {k: min(v) for k, v in times.items()}


class _Holder(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


def _peft_layer(lin: nn.Linear, n_adapters: int, r: int, dtype):
    from peft import LoraConfig, get_peft_model

    holder = _Holder(lin)
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], lora_dropout=0.0, init_lora_weights=False),
                           adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], lora_dropout=0.0, init_lora_weights=False))
    if n_adapters > 1:
        model.base_model.set_adapter([f"a{i}" for i in range(n_adapters)])
    return model.to(dtype).eval()


def layer_bench(hidden: int, n_experts: int, rank: int, tokens: int, dtype, rounds: int, reps: int) -> dict[str, float]:
    torch.manual_seed(0)
    R = n_experts * rank
    lin = nn.Linear(hidden, hidden, bias=False).to(dtype).eval()
    A = torch.randn(R, hidden, dtype=dtype) * 0.02
    B = torch.randn(hidden, R, dtype=dtype) * 0.02
    slot = torch.arange(n_experts).repeat_interleave(rank)
    state = RoutingState()
    router = LayerRouter(0, torch.randn(n_experts, hidden) * 0.02, None, Routing("token"), state)
    moe = MoeLoraLinear(lin, A, B, slot, torch.ones(R), router).eval()
    As = [A[i * rank:(i + 1) * rank].contiguous() for i in range(n_experts)]
    Bs = [B[:, i * rank:(i + 1) * rank].contiguous() for i in range(n_experts)]
    peft_one = _peft_layer(nn.Linear(hidden, hidden, bias=False).to(dtype), 1, R, dtype)
    peft_multi = _peft_layer(nn.Linear(hidden, hidden, bias=False).to(dtype), n_experts, rank, dtype)

    def ours(x):
        router.compute(x)
        return moe(x)

    def ours_module(x):
        return moe(x)

    def plain_lora(x):
        return lin(x) + F.linear(F.linear(x, A), B)

    def loop(x):
        pi = router.probs(x).to(x.dtype)
        y = lin(x)
        for i in range(n_experts):
            y = y + pi[..., i:i + 1] * F.linear(F.linear(x, As[i]), Bs[i])
        return y

    x = torch.randn(1, tokens, hidden, dtype=dtype)
    router.compute(x)
    fns = {"base": lin, "moe (ours)": ours, "moe module only": ours_module, f"peft lora r={R}": peft_one,
           f"plain lora r={R}": plain_lora, f"naive loop {n_experts}x": loop, f"peft {n_experts} active adapters": peft_multi}
    return timeit(fns, x, rounds=rounds, reps=reps)


def model_bench(n_experts: int, rank: int, tokens: int, dtype, rounds: int, reps: int, small: bool) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mergekit_moe.lora import Adapter, LoraFactors
    from mergekit_moe.moe.attach import attach_moe
    from mergekit_moe.moe.spec import MoeSpec

    # SmolLM2-135M's shape (random weights: speed does not depend on them)
    size = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
    if small:
        size.update(num_hidden_layers=6)
    cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, **size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets]
    experts = {}
    for e in range(n_experts):
        factors = {}
        for n in names:
            mod = model.get_submodule(n)
            factors[n] = LoraFactors(n, torch.randn(rank, mod.in_features) * 0.02, torch.randn(mod.out_features, rank) * 0.02, 1.0)
        experts[f"e{e}"] = Adapter({}, factors)
    spec = MoeSpec.from_experts("random-135m", "", experts, hidden_size=cfg.hidden_size)
    for lay in spec.layers.values():
        lay.router_weight.normal_(std=0.02)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens))
    # one copy per variant so the variants can be timed interleaved (background load hits all alike)
    tok_model = attach_moe(copy.deepcopy(model), spec)
    seq_model = attach_moe(copy.deepcopy(model), dataclasses.replace(spec, routing=Routing("sequence")))
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=n_experts * rank, lora_alpha=n_experts * rank, target_modules=targets,
                                                           lora_dropout=0.0, init_lora_weights=False)).eval()

    def fwd(m):
        return lambda x: m(input_ids=x, use_cache=False, logits_to_keep=1)

    return timeit({"base = one merged LoRA": fwd(model), f"moe (ours) {n_experts}x r{rank}, token": fwd(tok_model),
                   f"moe (ours) {n_experts}x r{rank}, sequence": fwd(seq_model),
                   f"peft lora r={n_experts * rank} (unmerged)": fwd(peft)}, ids, rounds=rounds, reps=reps)


def report(title: str, res: dict[str, float], tokens: int, base_key: str) -> None:
    base = res[base_key]
    print(f"\n{title}")
    print(f"{'variant':<40} {'ms/call':>9} {'tok/s':>11} {'x base':>7} {'overhead ms':>12}")
    for k, t in res.items():
        print(f"{k:<40} {t * 1e3:>9.3f} {tokens / t:>11.0f} {t / base:>7.3f} {(t - base) * 1e3:>12.3f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="realistic sizes: hidden 2048, 8 experts of rank 16, 2048 tokens")
    ap.add_argument("--model", action="store_true", help="also time a whole 135M-shaped model")
    ap.add_argument("--model-only", action="store_true", help="time only the whole model")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadiest on a shared machine)")
    ap.add_argument("--clock", choices=list(CLOCK), default=None,
                    help="cpu = this thread's CPU time (ignores time other processes take; only with --threads 1); "
                         "default: cpu with 1 thread, else wall")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None, help="override the layer size")
    ap.add_argument("--tokens", type=int, default=None, help="override the number of tokens per call")
    args = ap.parse_args(argv)
    global _clock
    torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    if clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures one thread; use it with --threads 1")
    _clock = CLOCK[clock]
    dtype = getattr(torch, args.dtype)
    hidden, E, r, tokens = (2048, 8, 16, 2048) if args.full else (1024, 8, 16, 256)
    hidden, tokens = args.hidden or hidden, args.tokens or tokens
    rounds = args.rounds or (15 if args.full else 7)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock} clock, {args.dtype}; layer {hidden}x{hidden}, "
          f"{E} experts x rank {r} (R={E * r}), {tokens} tokens")
    if not args.model_only:
        layer_report(layer_bench(hidden, E, r, tokens, dtype, rounds, reps=3 if args.full else 5), E, r, tokens)
    if args.model or args.model_only:
        m_tokens = 512 if args.full else 128
        mres = model_bench(4, 16, m_tokens, dtype, rounds=5 if args.full else 3, reps=1, small=not args.full)
        report(f"Model forward ({'30' if args.full else '6'}-layer SmolLM2-135M shape, 4 experts x rank 16 on all projections, "
               f"{m_tokens} tokens)", mres, m_tokens, "base = one merged LoRA")


def layer_report(res: dict[str, float], E: int, r: int, tokens: int) -> None:
    report("Layer forward", res, tokens, "base")
    base = res["base"]
    ov = {k: v - base for k, v in res.items()}
    lora = ov[f"peft lora r={E * r}"]
    print(f"\noverhead ratios: ours / peft-lora-R = {ov['moe (ours)'] / lora:.3f} (target <= 1.15), "
          f"ours-module / peft-lora-R = {ov['moe module only'] / lora:.3f}, "
          f"ours / plain-lora-R = {ov['moe (ours)'] / ov[f'plain lora r={E * r}']:.3f}, "
          f"naive-loop / ours = {ov[f'naive loop {E}x'] / ov['moe (ours)']:.2f} (target >= 3), "
          f"peft-multi / ours = {ov[f'peft {E} active adapters'] / ov['moe (ours)']:.2f}")


if __name__ == "__main__":
    main()
