"""Resource plan of a recipe before any compute (`minitron plan`): parameter counts, memory per GPU of every
stage, throughput, and a refusal naming the field to change when a stage cannot fit.

Only configs are read: the teacher's Hugging Face config.json (or the embedded model's), the students from the
prune targets. Notation: t, p = tensor / pipeline-parallel sizes, DP = gpus / (t p); e = bytes per element of
model.params_dtype (4 fp32, 2 bf16 / fp16); s = data.seq_length, b = the stage's micro_batch_size, n = s b tokens;
h, f, a, g, d, V, L = hidden, ffn, heads, KV groups, head dim, vocabulary, layers; a_t = a / t, g_t = max(g / t, 1),
f_t = f / t, V_t = V / t; /t_sp divides by t under sequence parallelism only.

Memory per GPU of a training stage (the project's trainer: Megatron DDP with grad_reduce_in_fp32, Megatron Adam):
  weights       e P                        P: this GPU's parameters (largest pipeline stage, TP shard)
  grads         4 P                        the float32 gradient buffer
  optimizer     (8 + 4 if e = 2) P / DP_o  Adam m, v and, for 16-bit weights, float32 master weights;
                                           DP_o = DP with parallel.use_distributed_optimizer, else 1
  teacher       e P_teacher                distill only (frozen, no grads)
  activations   what autograd saves (below) + Megatron's global buffer, held from forward to backward
  transient     the largest short-lived buffers on top of them: the loss buffers at their peak (below) or, with
                full recompute, the layer rebuilt in backward if larger
The peak is at the loss or in the backward right after it, with the Adam states of the previous step allocated.
The optimizer step adds no temporaries with Transformer Engine's / apex's fused Adam (the NeMo container); torch's
AdamW, Megatron's fallback without them, allocates a parameter-sized temporary or two (not counted).

Activations of one layer, per token (bytes), counted from what autograd saves in Megatron-Core's local layer spec
(tests/test_capacity.py compares them, and every stage's peak, with measurements on CPU):
  (6 h e + 8) /t_sp            two RMSNorms save input, normalised input (h each) and float32 1/rms; the QKV and
                               FC1 matmuls save their inputs
  + e d (3 a_t + a_t)          q and K, V repeated to a_t heads (GQA: a_t > g_t), the output projection's input;
    [e d (5 a_t + a_t)]        with a_t = g_t, V is a view that keeps the whole fused QKV output alive
  + a_t s (4 + e if e = 2)     softmax probabilities in float32 (and their 16-bit copy)
  + 5 f_t e                    FC1 output (2 f), silu(gate), up + 0, FC2 input
and once per layer 4 s d e (RoPE cos / sin of q and k). This is Korthikanti et al.'s accounting ("Reducing
Activation Recomputation in Large Transformer Models": 34 s b h + 5 a s^2 b bytes per layer for GPT-3 in 16-bit
with dropout masks, / t with sequence parallelism) for Llama's layer: GQA, SwiGLU, RMSNorm, RoPE, no dropout.
  model.recompute_granularity "full": h e /t_sp per token per layer (its input), and one layer's full set while
    backward rebuilds it (transient); "selective": core attention saves only its inputs, q a_t d + k g_t d + the
    fused QKV output (a_t + 2 g_t) d (V is a view of it), times e.
  model.transformer_impl "transformer_engine" (flash attention; an estimate, not measured here: no GPU): core
    attention saves q, k, v, its output and float32 log-sum-exp, (2 a_t + 2 g_t) d e + 4 a_t, and no s^2 term.
Once per micro-batch: the final norm and output-layer input (3 h e + 4) /t_sp per token. Layers held:
ceil(L / p) x min(p, micro-batches per step) (1F1B: the first stage holds p micro-batches in flight); under
pipeline parallelism this adds the last stage's loss buffers to the first stage's activations (an upper bound).
Global buffer (local spec): max(b a_t s^2 [attention scores], n h [sequence-parallel all-gather]) e, kept.

Loss buffers (logits are full-sequence [n, V_t] on every TP rank), c = chunk tokens (distill.chunk_size, else n):
  LM (correct-teacher): n V_t (4 + e if e = 2): float32 logits, softmax'ed in place into the gradient (and the
    16-bit logits), + V_t h e: the output weight's gradient before it joins the float32 buffer.
  KD: student logits n V_t 4 (float32: Megatron's Float16Module returns float32) + teacher logits n V_t e, and the
    largest of
      one chunk:      n V_t (12 + 4 if e = 2)   p_S, p_T, the log-ratio (+ the teacher's float32 copy)
      several chunks: c V_t (20 + 8 if e = 2)   forward: p_S, p_T, log-ratio, and the previous chunk's p_S, p_T
                      n V_t 4 + c V_t (12 + 4 if e = 2)  backward: the logits' gradient, one chunk's p_S, p_T and a
                                                         temporary
      V_t h e                                   the output layer's backward (weight gradient)
    distill.lm_loss_weight > 0 adds nothing at the peak (the cross-entropy's buffers follow the KD loss's).
  KD with distill.fuse_output_layer: 2 n h e (teacher's final hidden states, the student's hidden gradient) +
    V_t h e (output weight gradient) + c V_t (2 e + 16 + 8 + e if e = 2): both models' chunk logits, p_S, p_T,
    log-ratio, the previous chunk's gradient (+ float32 copies, the gradient's 16-bit copy). (Every loss kind is
    counted as forward_kl; intermediate-state losses are not counted.)
Score (forward only, local spec, no grads): weights + the global buffer + 2 n h e /t_sp (the last layer's output
and the final norm's) + the larger of the LM logits n V_t (4 + e if e = 2) and one layer's attention scores
b a_t s^2 (e + 4 + 4 + e if e = 2).
Prepare (convert): the teacher's weights e P.

Throughput: 6 N FLOPs per token to train a model of N parameters (8 N with full recompute), + 2 N_teacher for the
teacher's forward in distill, 2 N per token for scoring passes (each layer-skipping pass counted as a full one);
tokens/s = gpus x peak FLOP/s x MFU / FLOPs per token. Attention's s^2 FLOPs are not counted.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from dataclasses import dataclass, field

from nemo_minitron.config import EMBEDDED_MODEL, RecipeConfig
from nemo_minitron.models.arch import ModelArch, params_dtype

GIB = 2**30
H100_MEMORY_GIB = 80.0
H100_BF16_TFLOPS = 989.0  # dense, SXM
DEFAULT_MFU = 0.4
STATIC_TERMS = ("weights", "grads", "optimizer", "teacher")  # what a stage holds whatever its micro-batch


@dataclass(frozen=True)
class Layout:
    """The recipe's settings that size memory besides the model (see the module docstring for the symbols)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    dtype_bytes: int = 4
    recompute: str | None = None
    flash_attention: bool = False
    distributed_optimizer: bool = False

    @classmethod
    def from_recipe(cls, recipe: RecipeConfig, gpus: int) -> "Layout":
        par = recipe.parallel
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        if gpus < 1 or gpus % (tp * pp):
            raise ValueError(f"--gpus {gpus} is not a positive multiple of parallel.tensor_model_parallel_size x "
                             f"pipeline_model_parallel_size = {tp} x {pp}")
        return cls(tp=tp, pp=pp, dp=gpus // (tp * pp), sequence_parallel=par.sequence_parallel,
                   dtype_bytes=params_dtype(recipe.model.params_dtype).itemsize,
                   recompute=recipe.model.recompute_granularity,
                   flash_attention=recipe.model.transformer_impl == "transformer_engine",
                   distributed_optimizer=par.use_distributed_optimizer)


@dataclass
class StageMemory:
    """Bytes per GPU of one stage, by term; the recipe field that sets its micro-batch size and its value; the
    loss buffers within its transient term."""

    stage: str
    terms: dict[str, float]
    micro_batch_field: str = ""
    micro_batch_size: int = 0
    loss: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.terms.values())


@dataclass
class Plan:
    """The plan of ``recipe`` on ``gpus`` GPUs: architectures, memory per GPU of each stage, and per training /
    scoring stage its FLOPs per token and the tokens it processes."""

    recipe: RecipeConfig
    gpus: int
    gpu_memory_gib: float
    layout: Layout
    archs: dict[str, ModelArch]  # "teacher" and every prune target
    stages: list[StageMemory] = field(default_factory=list)
    throughput: list[tuple[str, float, float]] = field(default_factory=list)  # (stage, FLOPs/token, tokens)
    peak_tflops: float = H100_BF16_TFLOPS
    mfu: float = DEFAULT_MFU

    def tokens_per_second(self, flops_per_token: float) -> float:
        return self.gpus * self.peak_tflops * 1e12 * self.mfu / flops_per_token


# ---------------------------------------------------------------------------------------------- architectures


def teacher_arch(source: str) -> ModelArch:
    """The teacher's ModelArch from its config alone: ``source``'s config.json, or the embedded model's GGUF
    metadata (no weights are read)."""
    from transformers import AutoConfig

    from nemo_minitron.models.hf_convert import arch_from_hf_config, hf_config_arch

    if source != EMBEDDED_MODEL:
        return hf_config_arch(source)
    from nemo_minitron.models.embedded import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    return arch_from_hf_config(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))


def params_per_gpu(arch: ModelArch, tp: int, pp: int) -> int:
    """Parameters on the GPU holding the largest pipeline stage: ceil(L / p) layers sharded over TP (norms
    replicated; K/V replicated when g < t), the vocabulary-sharded embedding on the first stage and output layer
    (or, tied, the embedding's copy) on the last; with p = 1 both, the output layer only when untied."""
    h, d = arch.hidden_size, arch.kv_channels
    qkv = (arch.num_attention_heads // tp + 2 * max(arch.num_query_groups // tp, 1)) * d
    layer = h * qkv + (arch.num_attention_heads // tp) * d * h + 3 * h * (arch.ffn_hidden_size // tp) + 2 * h
    layer += qkv if arch.add_qkv_bias else 0
    embedding = arch.vocab_size // tp * h
    layers = math.ceil(arch.num_layers / pp) * layer
    if pp == 1:
        return layers + embedding * (1 if arch.tie_word_embeddings else 2) + h
    return layers + embedding + h  # the last stage: final norm + output layer (first: embedding only)


# ------------------------------------------------------------------------------------------------ activations


def _f32_extra(e: int, extra: float) -> float:
    """``extra`` bytes when the model runs in 16-bit (e = 2), else none."""
    return extra if e < 4 else 0


def layer_activation_bytes(arch: ModelArch, s: int, b: int, layout: Layout) -> float:
    """Bytes one transformer layer saves for backward for one micro-batch of b sequences of s tokens (module
    docstring); layout.recompute "selective" counts core attention's inputs only ("full": ``activation_bytes``)."""
    t, e, d = layout.tp, layout.dtype_bytes, arch.kv_channels
    a_t, g_t, f_t = arch.num_attention_heads // t, max(arch.num_query_groups // t, 1), arch.ffn_hidden_size // t
    sp = t if layout.sequence_parallel else 1
    per_token = (6 * arch.hidden_size * e + 8) / sp + 5 * f_t * e
    if layout.flash_attention:
        per_token += (2 * a_t + 2 * g_t) * d * e + 4 * a_t
    elif layout.recompute == "selective":  # q, k, the fused QKV output (v's storage), the output projection's input
        per_token += (a_t + g_t + (a_t + 2 * g_t) + a_t) * d * e
    else:
        qkv = 3 * a_t if a_t > g_t else 5 * a_t
        per_token += (qkv + a_t) * d * e + a_t * s * (4 + _f32_extra(e, e))
    return s * b * per_token + 4 * s * d * e


def activation_bytes(arch: ModelArch, s: int, b: int, layout: Layout, num_microbatches: int = 1) -> float:
    """Saved activations of a training step on the GPU holding the first pipeline stage, + the final norm and
    output-layer input, + Megatron's global buffer (local spec)."""
    sp = layout.tp if layout.sequence_parallel else 1
    e, h = layout.dtype_bytes, arch.hidden_size
    held = math.ceil(arch.num_layers / layout.pp) * min(layout.pp, num_microbatches)
    if layout.recompute == "full":  # every layer's input
        layers = held * s * b * h * e / sp
    else:
        layers = held * layer_activation_bytes(arch, s, b, layout)
    return layers + s * b * (3 * h * e + 4) / sp + global_buffer_bytes(arch, s, b, layout)


def global_buffer_bytes(arch: ModelArch, s: int, b: int, layout: Layout) -> float:
    """Megatron's global "mpu" buffer (local spec): the attention scores' baddbmm input b a_t s^2, or under sequence
    parallelism the all-gathered [s, b, h] input if larger, in the model's dtype; none with Transformer Engine."""
    if layout.flash_attention:
        return 0
    gathered = s * b * arch.hidden_size if layout.sequence_parallel else 0
    return max(b * (arch.num_attention_heads // layout.tp) * s * s, gathered) * layout.dtype_bytes


# ----------------------------------------------------------------------------------------------- loss buffers


def lm_loss_bytes(arch: ModelArch, n: int, layout: Layout) -> float:
    """LM loss buffers at their peak (module docstring): n V_t (4 + e if e = 2) + V_t h e."""
    e, v_t = layout.dtype_bytes, arch.vocab_size // layout.tp
    return n * v_t * (4 + _f32_extra(e, e)) + v_t * arch.hidden_size * e


def kd_loss_bytes(student: ModelArch, n: int, layout: Layout, chunk_size: int | None, fused: bool) -> float:
    """Logit-distillation buffers at their peak (module docstring), unfused or with the fused output layer."""
    e, h, v_t = layout.dtype_bytes, student.hidden_size, student.vocab_size // layout.tp
    c = min(chunk_size or n, n)
    output_grad = v_t * h * e
    if fused:
        return 2 * n * h * e + output_grad + c * v_t * (2 * e + 16 + _f32_extra(e, 8 + e))
    logits = n * v_t * (4 + e)
    if c == n:
        return logits + max(n * v_t * (12 + _f32_extra(e, 4)), output_grad)
    return logits + max(c * v_t * (20 + _f32_extra(e, 8)), n * v_t * 4 + c * v_t * (12 + _f32_extra(e, 4)),
                        output_grad)


# -------------------------------------------------------------------------------------------------- the plan


def training_memory(stage: str, section: str, arch: ModelArch, s: int, b: int, layout: Layout,
                    num_microbatches: int, loss: float, teacher: float | None = None) -> StageMemory:
    """Memory per GPU of a training stage of ``arch`` (module docstring) set by the recipe section ``section``, with
    ``loss`` bytes of loss buffers and, for distillation, ``teacher`` bytes of frozen teacher weights."""
    p, e = params_per_gpu(arch, layout.tp, layout.pp), layout.dtype_bytes
    terms = {"weights": e * p, "grads": 4 * p,
             "optimizer": (8 + _f32_extra(e, 4)) * p / (layout.dp if layout.distributed_optimizer else 1)}
    if teacher is not None:
        terms["teacher"] = teacher
    rebuilt = layer_activation_bytes(arch, s, b, dataclasses.replace(layout, recompute=None)) \
        if layout.recompute == "full" else 0
    terms.update(activations=activation_bytes(arch, s, b, layout, num_microbatches), transient=max(loss, rebuilt))
    return StageMemory(stage, terms, f"{section}.micro_batch_size", b, loss)


def score_memory(teacher: ModelArch, s: int, b: int, layout: Layout) -> StageMemory:
    """Memory per GPU of scoring (forward only, local layer spec; module docstring)."""
    e, t = layout.dtype_bytes, layout.tp
    local = dataclasses.replace(layout, flash_attention=False)  # scoring hooks the local spec's modules
    hidden = 2 * s * b * teacher.hidden_size * e / (t if layout.sequence_parallel else 1)
    logits = s * b * (teacher.vocab_size // t) * (4 + _f32_extra(e, e))
    attention = b * (teacher.num_attention_heads // t) * s * s * (e + 4 + _f32_extra(e, 4 + e))
    return StageMemory("score", {
        "weights": e * params_per_gpu(teacher, t, layout.pp),
        "activations": global_buffer_bytes(teacher, s, b, local) + hidden,
        "transient": max(logits, attention)}, "score.micro_batch_size", b, logits)


def _num_microbatches(recipe: RecipeConfig, section: str, dp: int) -> int:
    try:
        return getattr(recipe, section).train_config(seed=recipe.data.seed).num_microbatches(dp)
    except ValueError as err:  # TrainConfig names its own fields: say which section they came from
        raise ValueError(str(err).replace("train.", f"{section}.")) from None


def make_plan(recipe: RecipeConfig, gpus: int, gpu_memory_gib: float, peak_tflops: float = H100_BF16_TFLOPS,
              mfu: float = DEFAULT_MFU) -> Plan:
    """Parameters, memory per GPU and throughput of every stage ``recipe`` runs."""
    layout = Layout.from_recipe(recipe, gpus)
    teacher = teacher_arch(recipe.model.source)
    archs = {"teacher": teacher, **{name: target.new_arch(teacher) for name, target in recipe.prune.items()}}
    for name, arch in archs.items():
        try:
            arch.check_tensor_parallel(layout.tp)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    plan = Plan(recipe, gpus, gpu_memory_gib, layout, archs, peak_tflops=peak_tflops, mfu=mfu)
    s, e = recipe.data.seq_length, layout.dtype_bytes
    n_teacher = teacher.num_parameters()
    recompute_flops = 2 if layout.recompute == "full" else 0
    weights = e * params_per_gpu(teacher, layout.tp, layout.pp)
    plan.stages.append(StageMemory("prepare", {"weights": weights}))

    if recipe.correct.enabled:
        c = recipe.correct
        m = _num_microbatches(recipe, "correct", layout.dp)
        n = s * c.micro_batch_size
        plan.stages.append(training_memory("correct-teacher", "correct", teacher, s, c.micro_batch_size, layout, m,
                                           lm_loss_bytes(teacher, n, layout)))
        plan.throughput.append(("correct-teacher", (6 + recompute_flops) * n_teacher,
                                c.steps * c.global_batch_size * s))

    sc = recipe.score
    plan.stages.append(score_memory(teacher, s, sc.micro_batch_size, layout))
    block_sizes = set(sc.block_sizes) | ({1} if "lm_loss_drop" in sc.depth_metrics else set())
    passes = 1 + sum(teacher.num_layers - k + 1 for k in block_sizes) if block_sizes else 0
    plan.throughput.append(("score", 2 * n_teacher, s * (recipe.data.num_calibration
                                                         + passes * recipe.data.num_selection)))

    if recipe.prune:
        dist = recipe.distill
        student = archs[dist.student]
        m = _num_microbatches(recipe, "distill", layout.dp)
        n = s * dist.micro_batch_size
        loss = kd_loss_bytes(student, n, layout, dist.chunk_size, dist.fuse_output_layer)
        plan.stages.append(training_memory(f"distill ({dist.student})", "distill", student, s, dist.micro_batch_size,
                                           layout, m, loss, teacher=weights))
        plan.throughput.append((f"distill ({dist.student})",
                                (6 + recompute_flops) * student.num_parameters() + 2 * n_teacher,
                                dist.steps * dist.global_batch_size * s))
    return plan


def check_fits(plan: Plan) -> None:
    """ValueError naming the recipe field to change for the first stage whose memory exceeds the GPU's."""
    budget = plan.gpu_memory_gib * GIB
    recipe = plan.recipe
    for stage in plan.stages:
        if stage.total <= budget:
            continue
        terms = stage.terms
        static = sum(terms.get(k, 0) for k in STATIC_TERMS)
        if static > budget:
            fix = "parallel.tensor_model_parallel_size"
        elif stage.stage.startswith("distill") and stage.loss > terms["activations"]:
            fix = "distill.chunk_size" if recipe.distill.fuse_output_layer else "distill.fuse_output_layer"
        elif stage.micro_batch_size > 1:
            fix = stage.micro_batch_field
        elif recipe.model.recompute_granularity != "full" and stage.stage != "score":
            fix = "model.recompute_granularity"
        else:
            fix = "parallel.tensor_model_parallel_size"
        fixed = " + ".join(k for k in STATIC_TERMS if k in terms)
        raise ValueError(f"{stage.stage} needs {stage.total / GIB:.1f} GiB per GPU, more than --gpu-memory-gib "
                         f"{plan.gpu_memory_gib:g} ({fixed} alone: {static / GIB:.1f} GiB); change {fix}")


# ------------------------------------------------------------------------------------------------- the table


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _gib(size: float) -> str:
    return f"{size / GIB:.2f}" if size < 10 * GIB else f"{size / GIB:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_plan(plan: Plan) -> str:
    """The plan as readable tables: models, memory per GPU by stage, throughput."""
    lay, recipe = plan.layout, plan.recipe
    header = (f"{recipe.name}: {plan.gpus} GPU(s) x {plan.gpu_memory_gib:g} GiB; TP {lay.tp}, PP {lay.pp}, "
              f"DP {lay.dp}; {recipe.model.params_dtype}, {recipe.model.transformer_impl}"
              f"{', sequence parallel' if lay.sequence_parallel else ''}"
              f"{', distributed optimizer' if lay.distributed_optimizer else ''}"
              f"{f', recompute {lay.recompute}' if lay.recompute else ''}; seq {recipe.data.seq_length}")
    models = _table(["model", "params", "layers", "hidden", "ffn", "heads/groups"], [
        [name, _count(a.num_parameters()), a.num_layers, a.hidden_size, a.ffn_hidden_size,
         f"{a.num_attention_heads}/{a.num_query_groups}"] for name, a in plan.archs.items()])
    terms = ["weights", "grads", "optimizer", "teacher", "activations", "transient"]
    memory = _table(["memory per GPU (GiB)", *terms, "total", "fits"], [
        [s.stage, *(_gib(s.terms[k]) if k in s.terms else "-" for k in terms), _gib(s.total),
         "yes" if s.total <= plan.gpu_memory_gib * GIB else "NO"] for s in plan.stages])
    speed = _table(["throughput", "FLOPs/token", "tokens/s", "tokens", "time"], [
        [stage, f"{flops:.3g}", f"{plan.tokens_per_second(flops):,.0f}", f"{tokens:.3g}",
         _duration(tokens / plan.tokens_per_second(flops))] for stage, flops, tokens in plan.throughput])
    note = (f"Throughput assumes 6N FLOPs/token to train (8N with full recompute), +2N of the teacher in distill, "
            f"2N to score, at {plan.mfu:.0%} MFU of {plan.peak_tflops:g} TFLOP/s per GPU (--mfu, --peak-tflops). "
            f"Transient: logits and loss buffers (distill: both models' logits, or the fused chunks), or the layer "
            f"full recompute rebuilds. Memory counts tensors only: keep a few GiB for the CUDA context, NCCL and "
            f"fragmentation.")
    return "\n\n".join([header, models, memory, speed, textwrap.fill(note, 116)])


def plan_command(recipe: RecipeConfig, gpus: int | None, gpu_memory_gib: float, peak_tflops: float,
                 mfu: float) -> int:
    """`minitron plan`: print the plan (``gpus`` None: tensor x pipeline parallel size); SystemExit with one line
    naming the field to change when the layout is invalid or a stage cannot fit."""
    par = recipe.parallel
    gpus = par.tensor_model_parallel_size * par.pipeline_model_parallel_size if gpus is None else gpus
    try:
        if gpu_memory_gib <= 0 or peak_tflops <= 0 or not 0 < mfu <= 1:
            raise ValueError(f"--gpu-memory-gib and --peak-tflops must be > 0 and --mfu in (0, 1], got "
                             f"{gpu_memory_gib}, {peak_tflops}, {mfu}")
        plan = make_plan(recipe, gpus, gpu_memory_gib, peak_tflops, mfu)
        print(format_plan(plan), flush=True)
        check_fits(plan)
    except ValueError as err:
        raise SystemExit(f"minitron plan: {err}") from None
    return 0
