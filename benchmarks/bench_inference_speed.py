"""Inference speed of the pruned SmolLM2-135M shapes against its analytic limit, in the form users deploy: the
Hugging Face export.

Builds transformers LlamaForCausalLM models (the config `minitron export` writes: hf_config_from_arch) of the
teacher, the width-half student (hidden 384, ffn 1024, 6 heads, 3 KV groups) and the depth-half student (15
layers) with random weights (speed depends on shapes only), float32, eval, inference mode, the process's default
torch threads, and measures at equal batch:
  prefill  tokens/s of one forward over batch x 256 prompt tokens, logits at every position (headline batch 8; 1);
  decode   tokens/s of 32 greedy single-token steps with the KV cache (DynamicCache, cropped back to the 256-token
           prompt before every run) (headline batch 1, the latency case; 8).
Each round runs every measurement of every model, the models interleaved; the first round warms up; medians over
5 rounds (ratios: the median of the per-round ratios). Each student / teacher speed ratio is recorded next to its
analytic limit, with fraction_of_limit = ratio / limit (the project's goal: >= 0.9):
  flop_ratio   prefill FLOPs per token: 2 x the matmul weights (q/k/v/o, gate/up/down, LM head) + QK^T and AV,
               4 a d per layer per attended position, (s + 1) / 2 positions on average under the causal mask;
  bytes_ratio  float32 bytes a decode step reads: every weight (the tied LM head reads the whole matrix, the
               embedding lookup one row per sequence) + the KV cache at the mean context length, 256 + 33 / 2;
               cache_copy_limit counts the cache 3 times, as DynamicCache moves it: torch.cat copies it (read,
               write) every step before attention reads it.

What costs the difference (in the details): three more rounds with forward hooks (which add ~0.1 ms per layer to
a decode step, whatever the widths) split each time into attention, MLP, norms, LM head and the rest (embedding,
RoPE tables, residual adds, Python): module_ms, "linears" being the part of attention and MLP spent in their
linear layers.
  prefill  matmul_gflop_s: the rate of the linear layers and of the LM head inside the model; kernel_gflop_s: the
           first layer's linear layers run alone; non_matmul_ms: the rest (SDPA, RoPE, norms, SiLU, products,
           adds); page_faults: minor page faults per forward (glibc hands large freed blocks, such as the 8 x 256 x
           49152 logits, back to the OS, so every forward faults them in again), at page_fault_us each (a fresh
           400 MB tensor's first fill minus a refill); ratio_without_page_faults takes that time out.
  decode   a "bare" model with the same number of layers at hidden 64 (1 head, vocab 64; its weights stay in
           cache) measures what a step costs whatever the widths: fixed_ms_per_step. Modelling a step as fixed +
           bytes (cache counted 3 times) / bandwidth, the bandwidth fitted on the teacher (stream_gb_s), gives
           the limit corrected for the fixed cost and the cache copy: overhead_corrected_limit. linear_gb_s: the
           rate each model streams its linear layers' weights (their time minus the bare model's).

Usage: python -m benchmarks.bench_inference_speed
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections import Counter, defaultdict

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

from benchmarks.bench_pruned_speed import STUDENTS, TEACHER  # noqa: E402
from benchmarks.results import record  # noqa: E402
from nemo_minitron.models.arch import ModelArch  # noqa: E402

PROMPT, DECODE_STEPS, PREFILL_BATCHES, DECODE_BATCHES = 256, 32, (8, 1), (1, 8)  # headline batch first
REPEATS, HOOKED_REPEATS = 5, 3
MEAN_CONTEXT = PROMPT + (DECODE_STEPS + 1) / 2  # decode step i attends to PROMPT + i + 1 positions
BARE = dict(hidden_size=64, ffn_hidden_size=64, num_attention_heads=1, num_query_groups=1, vocab_size=64)
GROUPS = ("attention", "mlp", "norms", "lm_head")
CACHE_PASSES = 3  # DynamicCache.update concatenates (reads and writes the whole cache), then attention reads it


def linear_params(arch: ModelArch) -> int:
    """Weights of the decoder layers' linear layers: q, k, v, o, gate, up, down."""
    h, d = arch.hidden_size, arch.kv_channels
    attention = h * (2 * arch.num_attention_heads + 2 * arch.num_query_groups) * d
    return arch.num_layers * (attention + 3 * h * arch.ffn_hidden_size)


def matmul_params(arch: ModelArch) -> int:
    """Weights multiplied once per token: the layers' linear layers and the LM head."""
    return linear_params(arch) + arch.vocab_size * arch.hidden_size


def prefill_flops_per_token(arch: ModelArch) -> float:
    attention = 4 * arch.num_layers * arch.num_attention_heads * arch.kv_channels * (PROMPT + 1) / 2
    return 2 * matmul_params(arch) + attention


def decode_bytes_per_step(arch: ModelArch, batch: int, kv_passes: int = 1) -> float:
    h = arch.hidden_size
    weights = matmul_params(arch) + (2 * arch.num_layers + 1) * h + batch * h  # + the norms, the embedding rows
    kv_cache = batch * arch.num_layers * 2 * arch.num_query_groups * arch.kv_channels * MEAN_CONTEXT
    return 4 * (weights + kv_passes * kv_cache)


def minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def page_fault_seconds() -> float:
    """What one minor page fault costs: filling a fresh 400 MB tensor (its every page faults in) minus refilling it."""
    faults, start = minor_page_faults(), time.perf_counter()
    tensor = torch.empty(100 * 2**20).fill_(1.0)
    fresh, faults = time.perf_counter() - start, minor_page_faults() - faults
    start = time.perf_counter()
    tensor.fill_(1.0)
    return (fresh - (time.perf_counter() - start)) / faults


def attach_clock(model, clock: Counter) -> None:
    """Add the wall time (s) of every forward of the attention, MLP, norm, LM head modules and of the layers' linear
    layers to ``clock``."""

    def time_module(module, group: str) -> None:
        starts = []
        module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        module.register_forward_hook(lambda *_: clock.update({group: time.perf_counter() - starts.pop()}))

    for layer in model.model.layers:
        time_module(layer.self_attn, "attention")
        time_module(layer.mlp, "mlp")
        for module in [*layer.self_attn.children(), *layer.mlp.children()]:
            if isinstance(module, torch.nn.Linear):
                time_module(module, "linears")  # inside attention and mlp
        time_module(layer.input_layernorm, "norms")
        time_module(layer.post_attention_layernorm, "norms")
    time_module(model.model.norm, "norms")
    time_module(model.lm_head, "lm_head")


def kernel_gflop_s(model, tokens: int) -> float:
    """GFLOP/s of the first layer's linear layers run alone, each on ``tokens`` random rows (median of 5 runs)."""
    linears = [m for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    times = []
    for _ in range(5):
        inputs = [torch.randn(tokens, m.in_features) for m in linears]
        start = time.perf_counter()
        for linear, x in zip(linears, inputs):
            linear(x)
        times.append(time.perf_counter() - start)
    return 2 * tokens * sum(m.weight.numel() for m in linears) / statistics.median(times) / 1e9


def decode(model, cache, token) -> None:
    cache.crop(PROMPT - cache.get_seq_length())
    for _ in range(DECODE_STEPS):
        token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)


def main() -> None:
    from transformers import DynamicCache, LlamaForCausalLM

    from nemo_minitron.models.hf_convert import hf_config_from_arch

    torch.manual_seed(0)
    archs = {"teacher": TEACHER, **{f"{name}_half": arch for name, arch in STUDENTS.items()}}
    bare = {f"bare_{n}": TEACHER.replace(num_layers=n, **BARE) for n in {arch.num_layers for arch in archs.values()}}
    models = {name: LlamaForCausalLM(hf_config_from_arch(arch)).eval() for name, arch in {**archs, **bare}.items()}
    tokens = torch.randint(0, BARE["vocab_size"], (max(PREFILL_BATCHES), PROMPT),
                           generator=torch.Generator().manual_seed(0))
    clock = Counter()

    fault_s = statistics.median(page_fault_seconds() for _ in range(3))

    def measure(samples, key, run) -> None:
        clock.clear()
        faults, start = minor_page_faults(), time.perf_counter()
        run()
        samples[key].append({"total": time.perf_counter() - start, "page_faults": minor_page_faults() - faults,
                             **clock})

    def run_round(samples) -> None:
        for batch in PREFILL_BATCHES:
            for name in archs:
                measure(samples, ("prefill", batch, name), lambda: models[name](tokens[:batch]))
        for batch in DECODE_BATCHES:
            for name in models:
                measure(samples, ("decode", batch, name), lambda: decode(models[name], *states[batch, name]))

    timed, hooked = defaultdict(list), defaultdict(list)
    with torch.inference_mode():
        states = {}
        for batch in DECODE_BATCHES:
            for name, model in models.items():
                cache = DynamicCache(config=model.config)
                logits = model(tokens[:batch], past_key_values=cache, logits_to_keep=1).logits
                states[batch, name] = cache, logits.argmax(-1)
        for repeat in range(REPEATS + 1):
            run_round(timed if repeat else defaultdict(list))  # the first round warms up
        for model in models.values():
            attach_clock(model, clock)
        for _ in range(HOOKED_REPEATS):
            run_round(hooked)

    def roles(name) -> dict:
        return {"teacher": "teacher", "student": name}

    def per_run(samples, phase, batch, name, field="total") -> float:  # per forward (prefill) or decode step
        runs = samples[phase, batch, name]
        return statistics.median(s.get(field, 0.0) for s in runs) / (DECODE_STEPS if phase == "decode" else 1)

    def seconds(phase, batch, name) -> float:
        return per_run(timed, phase, batch, name)

    def module_ms(phase, batch, name) -> dict:
        ms = {g: 1e3 * per_run(hooked, phase, batch, name, g) for g in ("total", *GROUPS, "linears")}
        ms["other"] = ms["total"] - sum(ms[g] for g in GROUPS)
        return {g: round(v, 2) for g, v in ms.items()}

    def speed(phase, batch, name, tokens_per_run, limit) -> dict:
        ratio = statistics.median(t["total"] / s["total"] for t, s in zip(timed[phase, batch, "teacher"],
                                                                          timed[phase, batch, name]))
        return {"ratio": ratio, "limit": round(limit, 3), "fraction_of_limit": round(ratio / limit, 3),
                **{f"{role}_tokens_s": round(tokens_per_run / seconds(phase, batch, model), 1)
                   for role, model in roles(name).items()},
                "module_ms": {role: module_ms(phase, batch, model) for role, model in roles(name).items()}}

    def prefill_entry(name, batch) -> dict:
        flop_ratio = prefill_flops_per_token(TEACHER) / prefill_flops_per_token(archs[name])
        entry, n = speed("prefill", batch, name, batch * PROMPT, flop_ratio), batch * PROMPT
        faults = {role: per_run(timed, "prefill", batch, model, "page_faults") for role, model in roles(name).items()}
        busy = {role: seconds("prefill", batch, model) - faults[role] * fault_s for role, model in roles(name).items()}
        rates = {}
        for role, model in roles(name).items():
            a, ms = archs[model], entry["module_ms"][role]
            rates[role] = {"linears": round(2 * n * linear_params(a) / ms["linears"] / 1e6, 1),
                           "lm_head": round(2 * n * a.vocab_size * a.hidden_size / ms["lm_head"] / 1e6, 1)}
        with torch.inference_mode():
            kernels = {role: round(kernel_gflop_s(models[model], n), 1) for role, model in roles(name).items()}
        return {**entry, "matmul_gflop_s": rates, "kernel_gflop_s": kernels,
                "non_matmul_ms": {role: round(ms["total"] - ms["linears"] - ms["lm_head"], 2)
                                  for role, ms in entry["module_ms"].items()},
                "page_faults": {role: round(f) for role, f in faults.items()},
                "page_fault_ms": {role: round(1e3 * f * fault_s, 2) for role, f in faults.items()},
                "ratio_without_page_faults": round(busy["teacher"] / busy["student"], 3)}

    def decode_entry(name, batch) -> dict:
        limit = decode_bytes_per_step(TEACHER, batch) / decode_bytes_per_step(archs[name], batch)
        entry = speed("decode", batch, name, batch, limit)
        bare_of = {role: f"bare_{archs[model].num_layers}" for role, model in roles(name).items()}
        step = {role: seconds("decode", batch, model) for role, model in roles(name).items()}
        fixed = {role: seconds("decode", batch, bare_of[role]) for role in step}
        moved = {role: decode_bytes_per_step(archs[model], batch, CACHE_PASSES) for role, model in roles(name).items()}
        bandwidth = moved["teacher"] / (step["teacher"] - fixed["teacher"])
        corrected = step["teacher"] / (fixed["student"] + moved["student"] / bandwidth)
        entry["module_ms"]["bare_student"] = module_ms("decode", batch, bare_of["student"])
        linear_gb_s = {}
        for role, model in roles(name).items():
            ms = entry["module_ms"][role]["linears"] - module_ms("decode", batch, bare_of[role])["linears"]
            linear_gb_s[role] = round(4 * linear_params(archs[model]) / ms / 1e6, 1)
        return {**entry, "cache_copy_limit": round(moved["teacher"] / moved["student"], 3),
                "fixed_ms_per_step": {role: round(1e3 * t, 2) for role, t in fixed.items()},
                "stream_gb_s": round(bandwidth / 1e9, 1), "overhead_corrected_limit": round(corrected, 3),
                "fraction_of_corrected_limit": round(entry["ratio"] / corrected, 3), "linear_gb_s": linear_gb_s}

    common = dict(device="cpu", threads=torch.get_num_threads(), dtype="float32", repeats=REPEATS,
                  page_fault_us=round(1e6 * fault_s, 2),
                  attention=models["teacher"].config._attn_implementation, load_average_1min=os.getloadavg()[0])
    for name, arch in archs.items():
        if name == "teacher":
            continue
        flop_ratio = prefill_flops_per_token(TEACHER) / prefill_flops_per_token(arch)
        head, other = (prefill_entry(name, b) for b in PREFILL_BATCHES)
        record(f"{name}_throughput_ratio", head.pop("ratio"), batch=PREFILL_BATCHES[0], prompt_length=PROMPT, **head,
               **{f"batch_{PREFILL_BATCHES[1]}": other}, **common)
        record(f"{name}_flop_ratio", flop_ratio, prompt_length=PROMPT,
               teacher_flops_per_token=prefill_flops_per_token(TEACHER),
               student_flops_per_token=prefill_flops_per_token(arch),
               counted="2 x matmul weights incl. LM head + 4 a d L (s + 1) / 2 (causal QK^T, AV)")
        head, other = (decode_entry(name, b) for b in DECODE_BATCHES)
        record(f"{name}_decode_ratio", head.pop("ratio"), headline_batch=DECODE_BATCHES[0], prompt_length=PROMPT,
               decode_steps=DECODE_STEPS, mean_context=MEAN_CONTEXT, **head,
               **{f"batch_{DECODE_BATCHES[1]}": other}, **common)
        bytes_ratios = {b: decode_bytes_per_step(TEACHER, b) / decode_bytes_per_step(arch, b) for b in DECODE_BATCHES}
        record(f"{name}_bytes_ratio", bytes_ratios[DECODE_BATCHES[0]], headline_batch=DECODE_BATCHES[0],
               mean_context=MEAN_CONTEXT, **{f"batch_{b}": round(r, 3) for b, r in bytes_ratios.items()},
               teacher_bytes_per_step=decode_bytes_per_step(TEACHER, DECODE_BATCHES[0]),
               student_bytes_per_step=decode_bytes_per_step(arch, DECODE_BATCHES[0]),
               counted="float32: matmul weights incl. LM head, norms, 1 embedding row and the KV cache per sequence")


if __name__ == "__main__":
    main()
