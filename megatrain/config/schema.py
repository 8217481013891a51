"""The one typed config tree. Every field documented; validation messages name the field and the fix.

Sections: model, parallel, data, train, checkpoint, log (+ eval, search for the evaluation toolkit).
Unknown keys are rejected (``extra="forbid"``) so a typo never silently trains the wrong thing.
"""
from __future__ import annotations

import types
import typing
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_INT = 2**53  # any integer field above this is a typo (and past what a float round-trips exactly)


def _number_kinds(annotation) -> set:
    """int/float in a field's annotation (through Optional, tuple[...] and list[...])."""
    if annotation in (int, float):
        return {annotation}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, tuple, list):
        return set().union(*(_number_kinds(a) for a in typing.get_args(annotation)))
    return set()


class Section(BaseModel):
    # inf/nan are refused in every float field: an inf lr trains NaNs
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_numbers(cls, value, info: ValidationInfo):
        """YAML's true/false are not numbers here (pydantic would read ``lr: true`` as 1.0); integers are bounded
        so a 5000-digit value is an error, not an allocation."""
        kinds = _number_kinds(cls.model_fields[info.field_name].annotation)
        if not kinds:
            return value
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, bool):
                raise ValueError(f"must be a number, not {str(item).lower()}")
            if isinstance(item, int) and abs(item) > MAX_INT:
                raise ValueError(f"{str(item)[:20]}... is too large (limit {MAX_INT})")
        return value


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(Section):
    rank: int = Field(0, ge=0, le=4096, description="LoRA rank r of every adapter; 0 = LoRA off (all parameters "
                                                     "train, unless train.freeze says otherwise).")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: the adapter's output is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input (the base path sees "
                                                             "the input undropped).")
    targets: list[Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Projections of every block that get an adapter (module names: q_proj k_proj v_proj o_proj "
                    "gate_proj up_proj down_proj; gate_proj exists in llama only). Every other parameter is frozen.")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @model_validator(mode="after")
    def _check(self) -> "LoraConfig":
        if self.rank and not self.targets:
            raise ValueError("model.lora.targets is empty with model.lora.rank>0; name at least one projection "
                             "(e.g. [q_proj, v_proj]) or set rank: 0")
        return self


class ModelConfig(Section):
    arch: Literal["gpt2", "llama", "resnet", "lstm", "gru"] = Field(
        "gpt2", description="Architecture family: gpt2/llama (decoder Transformers), resnet (CNN), lstm/gru (RNN).")
    vocab_size: int = Field(0, ge=0, le=2**24, description="Vocabulary size; 0 = take it from the prepared data's tokenizer.")
    hidden_size: int = Field(128, gt=0, description="Model width d_model (RNN: hidden units).")
    num_layers: int = Field(2, gt=0, description="Transformer blocks / RNN layers.")
    num_heads: int = Field(4, gt=0, description="Attention query heads.")
    num_kv_heads: Optional[int] = Field(None, gt=0, description="Key/value heads (GQA); None = num_heads.")
    head_dim: Optional[int] = Field(
        None, gt=0, description="Per-head width; None = hidden_size / num_heads (set when heads were pruned).")
    ffn_hidden_size: Optional[int] = Field(
        None, gt=0, description="MLP inner width; None = 4*hidden (gpt2) or 8/3*hidden rounded to 64 (llama).")
    max_seq_len: int = Field(256, gt=0, le=2**22, description="Context length (learned positions for gpt2, RoPE table for llama).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on embeddings, attention output and MLP output.")
    norm_eps: float = Field(1e-5, gt=0, description="LayerNorm/RMSNorm epsilon.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base (llama).")
    rope_scaling: Optional[dict] = Field(
        None, description="HF-style rope_scaling dict (rope_type linear, llama3 or yarn); llama only.")
    family: Optional[Literal["gpt2", "llama", "mistral", "qwen2", "qwen3"]] = Field(
        None, description="Hugging Face model family (the model spec in megatrain/models/registry.py) used for "
                          "import and export; None = arch. Set from config.json by model.from_hf.")
    qkv_bias: bool = Field(False, description="Biases on the q/k/v projections (qwen2); gpt2 always has them.")
    qk_norm: bool = Field(False, description="RMSNorm over each query and key head before RoPE (qwen3).")
    sliding_window: Optional[int] = Field(
        None, gt=0, description="Each token attends to at most this many tokens, itself included (mistral); "
                                "None = full causal attention.")
    activation: Optional[Literal["gelu_tanh", "gelu", "relu", "silu"]] = Field(
        None, description="MLP activation (llama: of the gate); None = gelu_tanh for gpt2, silu for llama.")
    hf_special: dict = Field(
        default_factory=dict, description="bos/eos/pad token ids read from the Hugging Face directory, written back "
                                          "on export (set by model.from_hf).")
    hf_dtype: Optional[str] = Field(
        None, description="dtype of the Hugging Face source weights (set by model.from_hf); the export default.")
    tie_embeddings: Optional[bool] = Field(
        None, description="Share input embedding and LM head; None = True for gpt2, False for llama.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal weight init.")
    kernels: Literal["auto", "triton", "cuda", "torch"] = Field(
        "auto", description="Kernel backend for all ops: auto = per op, torch unless a benchmark record for this "
                            "GPU class under benchmarks/results/ shows the custom kernel faster (docs/kernels.md).")
    kernel_overrides: dict[str, str] = Field(
        default_factory=dict, description="Per-op backend, e.g. {attention: triton, rms_norm: torch}.")
    from_hf: Optional[str] = Field(None, description="Local Hugging Face model directory to initialise from.")
    init_from: Optional[str] = Field(
        None, description="Initialise the weights (and BatchNorm statistics) from a saved model: a pruned/distilled "
                          "model dir, a megatrain run/checkpoint dir or a Hugging Face dir; optimizer and schedule "
                          "start fresh. Its model sizes must equal the config's.")
    # CNN / RNN fields (used by arch resnet / lstm / gru)
    num_classes: int = Field(10, gt=0, description="Classes for classification heads (resnet, rnn classification).")
    in_channels: int = Field(1, gt=0, description="Image channels (resnet).")
    widths: list[int] = Field(default_factory=lambda: [16, 32, 64], description="ResNet stage widths.")
    blocks_per_stage: list[int] = Field(default_factory=lambda: [1, 1, 1], description="ResNet blocks per stage.")
    block: Literal["basic", "bottleneck"] = Field("basic", description="ResNet block type.")
    inner_widths: Optional[list[int]] = Field(
        None, description="ResNet per-stage inner width of every block (basic: conv1 out; bottleneck: conv1/conv2 "
                          "out), the residual stream stays widths*expansion; None = widths (set by channel pruning).")
    rnn_hidden_size: Optional[int] = Field(
        None, gt=0, description="LSTM/GRU recurrent width; the embedding keeps hidden_size; None = hidden_size "
                                "(set by hidden-unit pruning).")
    bidirectional: bool = Field(False, description="Bidirectional RNN (classification only).")
    task: Literal["language_modeling", "classification"] = Field(
        "language_modeling", description="Loss/metric head: next-token LM or sequence/image classification.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Low-rank adapters on the block projections "
                                                                      "(docs/finetuning.md).")

    @property
    def is_transformer(self) -> bool:
        return self.arch in ("gpt2", "llama")

    @property
    def mlp_activation(self) -> str:
        return self.activation or ("gelu_tanh" if self.arch == "gpt2" else "silu")

    @property
    def hf_family(self) -> str:
        return self.family or self.arch

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


    @property
    def attn_head_dim(self) -> int:
        """Per-head width: model.head_dim, or hidden_size / num_heads."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.arch == "llama":
            return 64 * ((int(8 * self.hidden_size / 3) + 63) // 64)
        return 4 * self.hidden_size

    @property
    def tied(self) -> bool:
        return self.arch == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    @property
    def stage_inner_widths(self) -> list[int]:
        """ResNet inner width per stage: model.inner_widths, or widths."""
        return list(self.inner_widths) if self.inner_widths is not None else list(self.widths)

    @property
    def rnn_width(self) -> int:
        """LSTM/GRU hidden units per layer and direction: model.rnn_hidden_size, or hidden_size."""
        return self.rnn_hidden_size or self.hidden_size

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.is_transformer:
            if self.head_dim is None and self.hidden_size % self.num_heads:
                raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads="
                                 f"{self.num_heads}; choose num_heads dividing hidden_size")
            if self.num_heads % self.kv_heads:
                raise ValueError(f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads="
                                 f"{self.kv_heads}; choose num_kv_heads dividing num_heads")
            if self.arch == "llama" and self.attn_head_dim % 2:
                raise ValueError(f"model: head_dim={self.attn_head_dim} must be even for RoPE; change hidden_size/num_heads")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.arch, self.rope_scaling)
        if self.init_from and self.from_hf:
            raise ValueError("model.init_from and model.from_hf are both set; choose one weights source")
        if self.inner_widths is not None and (len(self.inner_widths) != len(self.widths)
                                              or any(w <= 0 for w in self.inner_widths)):
            raise ValueError(f"model.inner_widths={self.inner_widths} needs one positive width per stage of "
                             f"model.widths={self.widths}; fix it or leave it unset")
        if self.lora.enabled and not self.is_transformer:
            raise ValueError(f"model.lora.rank={self.lora.rank} needs a Transformer (gpt2/llama), not "
                             f"model.arch={self.arch}; set model.lora.rank=0 or use train.freeze")
        if self.rnn_width != self.hidden_size and self.tied:
            raise ValueError(f"model.rnn_hidden_size={self.rnn_hidden_size} differs from model.hidden_size="
                             f"{self.hidden_size} but model.tie_embeddings=true needs the LM head's input to be the "
                             "embedding width; set tie_embeddings: false or drop rnn_hidden_size")
        return self


ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _check_rope_scaling(arch: str, scaling: dict) -> None:
    """The rope_scaling dicts ops/rope.py implements, checked here so a typo fails before any rank starts."""
    if arch != "llama":
        raise ValueError(f"model.rope_scaling is set but model.arch={arch} has no RoPE (only llama); remove it")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"model.rope_scaling: rope_type {kind!r} is not supported; use one of {', '.join(ROPE_TYPES)}")
    need = {"default": (), "linear": ("factor",),
            "llama3": ("factor", "original_max_position_embeddings"),
            "yarn": ("factor", "original_max_position_embeddings")}[kind]
    for key in need + tuple(k for k in ("low_freq_factor", "high_freq_factor") if k in scaling):
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"model.rope_scaling.{key}={value!r}: {kind} scaling needs a positive finite number")
    if kind == "llama3" and scaling.get("low_freq_factor", 1.0) >= scaling.get("high_freq_factor", 4.0):
        raise ValueError("model.rope_scaling: low_freq_factor must be below high_freq_factor")


class ParallelConfig(Section):
    tp: int = Field(1, gt=0, description="Tensor-parallel size (splits heads and MLP channels).")
    pp: int = Field(1, gt=0, description="Pipeline-parallel stages.")
    dp: Optional[int] = Field(None, gt=0, description="Data-parallel size; None = world_size / (tp*pp).")
    sequence_parallel: bool = Field(False, description="Shard norm/dropout regions along the sequence (needs tp>1).")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage over the data-parallel group.")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="ZeRO optimizer-state offload target.")
    activation_checkpointing: Literal["none", "every", "every_n"] = Field(
        "none", description="Recompute activations of every block, or every N-th (checkpoint_every_n).")
    checkpoint_every_n: int = Field(2, gt=0, description="N for activation_checkpointing=every_n.")
    pipeline_partition: Literal["parameters", "uniform"] = Field(
        "parameters", description="How pipeline stages are balanced: by parameter count or by layer count.")


class DataConfig(Section):
    path: str = Field("data_cache/stdlib", description="Prepared data directory (train/val .bin/.idx shards + tokenizer).")
    sources: list[str] = Field(
        default_factory=lambda: ["stdlib"],
        description="Inputs for prepare: files, folders, .jsonl (one shape per file: {text}, {prompt, completion} or "
                    "{messages}); 'stdlib' = the Python stdlib sources; 'chat_demo' = the chat JSONL megatrain ships.")
    tokenizer: Optional[str] = Field(
        None, description="Existing sentencepiece .model or HF tokenizer dir; None = train sentencepiece on the data.")
    vocab_size: int = Field(4096, gt=0, description="Vocabulary size when training a sentencepiece tokenizer.")
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0, description="Fraction of documents held out for validation.")
    min_chars: int = Field(32, ge=0, description="Documents shorter than this after cleaning are dropped.")
    max_bytes: Optional[int] = Field(None, gt=0, description="Stop reading sources after this many bytes (quick runs).")
    num_workers: int = Field(2, gt=0, description="Tokenizer worker processes in prepare.")
    force_prepare: bool = Field(
        False, description="Prepare data.path again even when it is up to date (once per launch: the other ranks "
                           "of the same launch reuse that build). Works from launch/prepare.py, pretrain.py and "
                           "finetune.py.")
    verify_checksums: bool = Field(
        True, description="Check every shard's CRC-32 against meta.json when prepare reuses data.path and when "
                          "training first opens it (about 1 s per GB); false skips it for huge corpora (sizes and "
                          "the token id range are still checked).")
    chat_template: Optional[str] = Field(
        None, description="How {messages} records are rendered: None = the tokenizer's own chat template "
                          "(tokenizer_config.json / chat_template.jinja), else the built-in one; 'builtin'; a .jinja "
                          "file; or a jinja template string. Rendered by transformers' chat-template machinery.")
    train_on_prompt: bool = Field(
        False, description="SFT data: keep prompt / system / user tokens in the loss too (default: only completion and "
                           "assistant tokens). Read at training time; no new prepare needed.")
    packing: Optional[Literal["stream", "documents", "none"]] = Field(
        None, description="stream = documents concatenated and cut into seq_len windows; documents = whole documents "
                          "packed greedily into rows with positions/segments restarting per document and no label "
                          "across documents; none = one document per row, right-padded. None = documents for SFT data "
                          "(prompt/completion or messages), stream for plain text.")
    seq_len: Optional[int] = Field(None, gt=0, le=2**22, description="Training sample length; None = model.max_seq_len.")
    dataset: Literal["tokens", "digits", "images", "npz"] = Field(
        "tokens", description="tokens = prepared text shards; digits = sklearn digits; images/npz = user image data.")
    augment: bool = Field(False, description="On-the-fly augmentation for image data.")
    split_seed: int = Field(
        0, ge=0, lt=2**31, description="Seed of the image train/validation split. Independent of train.seed, so runs with different "
                       "seeds, search trials and ensemble members are scored on the same validation samples.")


class TrainConfig(Section):
    seed: int = Field(1234, ge=0, lt=2**31, description="Seed for init, data order and dropout (0 <= seed < 2^31).")
    max_steps: int = Field(100, gt=0, description="Optimizer steps to train.")
    global_batch_size: int = Field(8, gt=0, le=2**24, description="Samples per optimizer step across all data-parallel ranks.")
    micro_batch_size: int = Field(4, gt=0, le=2**20, description="Samples per forward/backward per rank.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision (fp16 uses loss scaling).")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr: float = Field(0.0, ge=0, description="Floor of the cosine schedule.")
    schedule: Literal["constant", "step", "exponential", "cosine"] = Field("cosine", description="LR schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (from 0 to lr).")
    step_size: int = Field(100, gt=0, description="step schedule: multiply by gamma every step_size steps.")
    gamma: float = Field(0.5, gt=0, le=1, description="step/exponential schedule decay factor.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    momentum: float = Field(0.9, ge=0, description="SGD momentum.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay (not applied to norms/biases).")
    l1: float = Field(0.0, ge=0, description="Explicit L1 penalty coefficient added to the loss.")
    l2: float = Field(0.0, ge=0, description="Explicit L2 penalty coefficient added to the loss (coupled).")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 disables.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    fused_linear_ce: bool = Field(
        False, description="Language modelling: compute the LM head and the cross-entropy together in token chunks "
                           "(the Triton fused linear+CE on GPU) so the (tokens, vocab) logits are never held; "
                           "Transformers with parallel.tp=1, pp=1 and zero_stage<=2.")
    eval_every: int = Field(50, ge=0, description="Validation every N steps; 0 = only at the end.")
    eval_batches: int = Field(8, ge=0, description="Micro-batches per validation pass (per rank); 0 = the whole "
                                                   "validation split.")
    log_every: int = Field(1, gt=0, description="Metrics line every N steps.")
    loss_scale_window: int = Field(100, gt=0, description="fp16 dynamic loss scale window.")
    deepspeed_config: Optional[str] = Field(None, description="User DeepSpeed JSON merged into the generated one.")
    nonfinite: Literal["skip", "stop", "rollback"] = Field(
        "skip", description="A step whose loss or gradients are non-finite on any rank is never applied. skip: go on "
                            "with the next batch (up to train.max_nonfinite_skips in a row, then stop); stop: stop at "
                            "once; rollback: reload the last checkpoint and skip the offending batch. A stop is one "
                            "line naming the step (exit 2).")
    max_nonfinite_skips: int = Field(3, ge=0, description="Consecutive non-finite steps skipped (or rolled back) "
                                                          "before the run stops.")
    freeze: list[str] = Field(
        default_factory=list,
        description="Parameters that do not train (no gradient, no optimizer state): glob patterns over the "
                    "parameter names of the plain model (e.g. 'layers.0.*', '*.attn_norm.*'), 'embeddings' (token "
                    "and position tables; with tied embeddings the LM head too) and 'layers.<N' (blocks 0..N-1). "
                    "A pattern that matches no parameter is an error. docs/finetuning.md.")

    @field_validator("freeze")
    @classmethod
    def _check_freeze(cls, patterns: list[str]) -> list[str]:
        for pat in patterns:
            if pat.startswith("layers.<") and not pat[len("layers.<"):].isdigit():
                raise ValueError(f"train.freeze: {pat!r} is not 'layers.<N' with a whole number N (e.g. 'layers.<4')")
            if not pat.strip():
                raise ValueError("train.freeze holds an empty pattern; remove it")
        return patterns


class CheckpointConfig(Section):
    dir: Optional[str] = Field(None, description="Checkpoint directory; None = <log.dir>/checkpoints.")
    every: int = Field(0, ge=0, description="Save every N steps; 0 = only at the end.")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept; the newest good one is never deleted.")
    resume: str = Field("none", description="'none', 'auto' (latest in dir if any), or a checkpoint path.")
    save_final: bool = Field(True, description="Save when training finishes.")
    export_hf: Optional[str] = Field(
        None, description="Write a Hugging Face model directory here at the end (weights, config.json, "
                          "generation_config.json and the tokenizer files of the prepared data).")
    export_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = Field(
        None, description="dtype of the exported weights; None = the source model's dtype (model.from_hf), else float32.")
    export_overwrite: bool = Field(
        False, description="Allow export_hf to point at a non-empty directory; only its model files (weights, "
                           "config.json, generation_config.json, tokenizer files) are replaced, others are kept.")
    export_peft: Optional[str] = Field(
        None, description="Write the LoRA adapters here at the end, as a PEFT adapter directory (adapter_config.json, "
                          "adapter_model.safetensors) that peft.PeftModel.from_pretrained(hf_base, dir) loads; needs "
                          "model.lora.rank>0. export_hf meanwhile writes the base with the adapters merged.")
    reset_optimizer: bool = Field(False, description="On resume, keep weights but start fresh optimizer state (continual).")
    reset_schedule: bool = Field(False, description="On resume, restart the LR schedule and step count (continual).")
    preempt_signals: list[Literal["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"]] = Field(
        default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"],
        description="Signals that preempt the run: every rank finishes the current step, saves a checkpoint and exits "
                    "with code 75; a second signal (1 s or more later) exits at once. [] = default signal handling.")
    on_save_error: Literal["stop", "continue"] = Field(
        "stop", description="A save that fails (no space, I/O error, a non-finite tensor): the partial step is removed "
                            "and latest is unchanged on every rank; stop ends the run (exit 2), continue trains on.")


class LogConfig(Section):
    dir: str = Field("runs/default", description="Run directory: metrics.jsonl, TensorBoard events, report.png.")
    progress: Literal["rich", "tqdm", "plain", "none"] = Field("rich", description="Console progress display.")
    tensorboard: bool = Field(True, description="Write TensorBoard events.")
    hang_report_s: float = Field(600.0, ge=0, description="A rank whose setup, training step, validation or "
                                 "checkpoint save runs longer than this reports it with its Python stacks (stderr "
                                 "and <log.dir>/hang_rank<R>.txt); the run goes on. 0 = off.")
    report: bool = Field(True, description="Write report.png (loss/lr/throughput) at the end.")


class EvalConfig(Section):
    kfold: int = Field(0, ge=0, description="K-fold cross-validation folds (0 = off; 1 is rejected).")
    stratified: bool = Field(True, description="Stratify folds by label for classification.")
    metric: str = Field("loss", description="Metric used to rank trials / pick checkpoints (loss, accuracy, f1_macro, ...).")
    ensemble: list[str] = Field(default_factory=list, description="Checkpoint paths whose predictions are averaged.")
    ensemble_mode: Literal["mean_prob", "vote"] = Field("mean_prob", description="Ensemble: average probabilities or majority vote.")
    ensemble_members: int = Field(
        0, ge=0, description="Train this many members (seeds train.seed, +1, ...) in <log.dir>/member_i, resumable, "
                             "then score their ensemble; 0 = off (use eval.ensemble for existing checkpoints).")
    old_data: Optional[str] = Field(None, description="Continual training: data path whose validation tracks forgetting.")


class SearchConfig(Section):
    space: Optional[str] = Field(None, description="YAML file: config field -> list (grid) or {low, high, log} / list (random).")
    method: Literal["grid", "random", "tpe"] = Field(
        "random", description="grid (every combination), random, or tpe (Optuna's model-based sampler; needs optuna).")
    trials: int = Field(6, gt=0, description="Random/TPE search trials.")
    mode: Literal["min", "max"] = Field("min", description="Whether eval.metric is minimised or maximised.")


class PruneConfig(Section):
    source: Optional[str] = Field(
        None, description="Model to prune: a megatrain checkpoint (run dir, checkpoints dir or step dir), a pruned "
                          "model dir, or a local Hugging Face dir; None = the model built from the config seed.")
    out: Optional[str] = Field(None, description="Pruned model directory (safetensors + config.yaml); None = <log.dir>/pruned.")
    mlp: float = Field(0.0, ge=0.0, description="Fraction of MLP intermediate channels removed from every layer (< 1).")
    heads: float = Field(0.0, ge=0.0, description="Fraction of attention heads removed from every layer (< 1).")
    layers: float = Field(0.0, ge=0.0, description="Fraction of whole Transformer blocks removed (depth, < 1).")
    channels: float = Field(
        0.0, ge=0.0, description="resnet/lstm/gru: fraction of inner conv channels of every residual block "
                                 "(per stage) / of hidden units of every RNN layer removed (< 1).")
    gqa: Literal["groups", "within"] = Field(
        "groups", description="GQA head pruning: remove whole kv groups (kv head + its query heads), or the same "
                              "number of query heads inside every group (kv heads kept).")
    importance: Literal["l1", "l2", "taylor", "activation"] = Field(
        "taylor", description="Unit importance: weight magnitude (l1/l2), first-order Taylor |w*dL/dw| or "
                              "mean |activation| over calibration batches.")
    calib_batches: int = Field(8, gt=0, description="Calibration micro-batches per rank for taylor/activation importance.")
    schedule: Literal["oneshot", "iterative"] = Field(
        "oneshot", description="Prune to the target at once, or in prune.iterations equal steps with fine-tuning between.")
    iterations: int = Field(3, gt=0, description="Pruning steps for schedule=iterative.")
    finetune_steps: int = Field(0, ge=0, description="Trainer steps of fine-tuning after each pruning step (0 = none).")
    measure_batches: int = Field(4, gt=0, description="Micro-batches timed for the tokens/s column of the report.")

    @model_validator(mode="after")
    def _check(self) -> "PruneConfig":
        for name in ("mlp", "heads", "layers", "channels"):
            if getattr(self, name) >= 1.0:
                raise ValueError(f"prune.{name}={getattr(self, name)} would remove every unit; "
                                 "use a fraction in [0, 1)")
        return self


class DistillConfig(Section):
    teacher: Optional[str] = Field(
        None, description="Teacher: a megatrain checkpoint (run dir, checkpoints dir or step dir), a pruned model "
                          "dir, or a local Hugging Face dir. Frozen, eval mode, no optimizer state.")
    student: Optional[str] = Field(
        None, description="Initial student weights (e.g. a prune.out dir); None = a fresh model from the config.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the soft-target KL; (1 - alpha) weighs hard-label CE.")
    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature T of the KL (the KL term is scaled by T^2).")
    hidden_mse: float = Field(
        0.0, ge=0.0, description="Weight of an MSE between last-block hidden states (learned projection when widths differ).")
    teacher_bf16: bool = Field(False, description="Run the teacher in bf16 (halves its memory; logits upcast for the loss).")
    teacher_zero3: bool = Field(
        False, description="Partition the teacher's weights over the data-parallel ranks (ZeRO-3 inference: each "
                           "rank stores 1/dp of them and gathers one layer at a time for the forward); for a teacher "
                           "too large for one rank. Combines with tp sharding and teacher_bf16.")
    teacher_cache: Optional[str] = Field(
        None, description="Directory of precomputed top-k teacher log-probs (written by launch/cache_teacher.py); "
                          "when set, training reads it instead of running the teacher (KL over top-k + a tail "
                          "bucket). Needed for parallel.pp>1.")
    cache_topk: Optional[int] = Field(
        None, gt=0, description="k: teacher tokens kept per position. Writing: None = 32; reading: None = the "
                                "cache's k, else it must match.")
    cache_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Storage of the cached top-k log-probs (fp16 halves the cache; the tail mass is fp32).")
    cache_samples: Optional[int] = Field(
        None, gt=0, description="Cache only the first N training samples (training then draws from those); "
                                "None = the whole training split.")


class PlanConfig(Section):
    world_size: Optional[int] = Field(
        None, gt=0, description="Ranks to plan for (launch/plan.py); None = the launcher's WORLD_SIZE, or 1.")
    gpu_memory_gib: Optional[float] = Field(
        None, gt=0, description="Memory per GPU. When set, launch/plan.py and every training launch refuse, before "
                                "any process group or GPU is touched, a layout whose predicted peak exceeds it.")
    reserved_gib: float = Field(
        1.0, ge=0, description="Per-rank allowance for what the planner does not model (CUDA context, NCCL buffers, "
                               "allocator slack); an assumption, not a measurement.")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.max_seq_len

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.seq_len > self.model.max_seq_len and self.model.arch == "gpt2":
            raise ValueError(f"data.seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                             "raise model.max_seq_len or lower data.seq_len")
        if self.checkpoint.export_peft and not self.model.lora.enabled:
            raise ValueError("checkpoint.export_peft is set but model.lora.rank=0 (no adapters to export); set "
                             "model.lora.rank>0 or use checkpoint.export_hf")
        if self.train.schedule == "cosine" and self.train.min_lr > self.train.lr:
            raise ValueError(f"train.min_lr={self.train.min_lr} is above train.lr={self.train.lr}; lower min_lr")
        return self
