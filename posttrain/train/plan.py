"""Resource planner: memory per GPU, the largest batch that fits, step time and run time, before a run.

``plan(request) -> Plan`` adds up, per GPU:

* **model states** (parameters, gradients, optimiser states) from the parameter count of the preset
  (built on the meta device, so nothing is allocated) and the ZeRO stage. For bf16 mixed precision the
  byte counts are DeepSpeed's own estimators' (``estimate_zero2_model_states_mem_needs``: 2 P + 18 P / N,
  ``estimate_zero3_model_states_mem_needs``: 18 P / N + 4 L, both without offload; ZeRO-1 adds the
  unpartitioned bf16 gradient DeepSpeed's shared stage-1/2 estimator leaves out;
  ``tests/train/test_plan.py`` checks the totals against them):

  ======  ===================  =====================================  ================================
  stage   parameters           gradients                              optimiser states (AdamW)
  ======  ===================  =====================================  ================================
  1       2 P (bf16 replica)   2 P (bf16, unpartitioned) + 4 P / N    12 P / N (fp32 master, m, v)
  2       2 P (bf16 replica)   6 P / N (bf16 + fp32 partitions)       12 P / N
  3       2 P / N + 2 L        4 P / N + 2 L                          12 P / N
  ======  ===================  =====================================  ================================

  (P parameters, N GPUs, L the largest single module's parameters: ZeRO-3 gathers one module's
  weights and gradients at a time.) fp32 training has no master copy: parameters 4 P, gradients
  4 P (stage 3: both / N, + 4 L each), optimiser 8 P / N.
* **the optimiser step's temporaries**: none with the fused AdamW used on CUDA; 8 P / N with torch's
  unfused update (the CPU): ``sqrt(v)`` and its quotient, each an fp32 copy of the owned partition.
* **SAM's extra copy**: none in bf16 and under ZeRO-1/2 (the weights are restored from the fp32 master,
  ``posttrain.train.sam``); 4 P / N under ZeRO-3 fp32 (a saved copy of the owned partitions); LookSAM
  keeps the plain gradient's owned partitions in fp32 on top (4 P / N).
* **GRPO's frozen models** (``frozen_models``: 1 reference for GRPO_s, + the old policy for GRPO): each
  holds the weights as the policy does, in the training precision, 2 P / N under ZeRO-3 (a DeepSpeed
  engine without an optimiser over the same partitions, ``posttrain.train.grpo``), the full 2 P under
  ZeRO-1/2; their no-grad forwards add one forward (1/3 of a training pass) each to the step time.
* **communication buffers**: gradients are reduced through a flat bucket of ``reduce_bucket_elements``
  (``train.reduce_bucket_elements``; ZeRO-1/2 keep two in flight with ``overlap_comm``).
* **activations**: ``batch_seconds`` x bytes per audio-second. The per-audio-second figure is an
  element count of the tensors autograd keeps (feature-extractor conv outputs, then per transformer
  layer and frame 8 D + 2 F without activation checkpointing, D per layer plus one recomputed layer with
  it; 50 frames per second), times a factor fitted on CPU measurements of ``python -m posttrain.bench
  fullsize --activations``: peak-RSS slope (bytes per extra audio-second, xlsr_300m bf16, 4 s vs 8 s
  clips) divided by the element count. ``ACTIVATION_FIT`` records the fit; the GPU benchmark
  (``python -m posttrain.bench gpu``) prints the measured peak next to this prediction.
* a fixed **reserve** for the CUDA context, NCCL and the caching allocator's fragmentation.

Checkpoint: DeepSpeed writes the module's weights in the training precision (2 P, fp32 4 P; rank 0
alone under ZeRO-1/2, partitioned under ZeRO-3) and every rank its optimiser partition, 12 P / N in every
precision (the fp32 flat partition ZeRO keeps even for fp32 training, and Adam's two moments). The busiest node writes its share at ``checkpoint_write_gbps`` (the shared file system's write
rate per node, an assumption until measured: the trainer logs ``checkpoint/write_seconds``; give it as
``checkpoint_seconds``). A stop on the scheduler's warning needs one step to end and one checkpoint to be
written: ``stop_lead_seconds`` (1.5 x that + 30 s for the signal's way and the requeue, rounded up to
10 s, at least 60 s) is the N of ``sbatch --signal=B:USR1@N``.

Checked against CPU measurements (``python -m posttrain.bench fullsize``, docs/scaling.md), bf16, per
rank: xlsr_300m at world size 2 ZeRO-2 +3 % (SAM step; plain +10 %), ZeRO-3 -11 % (0.5 GiB of gather
buffers and bookkeeping not modelled); xlsr_1b ZeRO-3 forward + backward +9 %. The reserve covers that.

Time: training FLOPs from ``posttrain.train.flops`` (model FLOPs, 3 x forward; SAM runs two passes;
activation checkpointing executes a fourth forward-unit, ``RECOMPUTE_FACTOR``) at a given utilisation
of the GPU's peak by the executed FLOPs (``hfu``); the MFU printed keeps the model-FLOPs convention
(recompute not counted), so it is ``hfu`` x 3/4 with checkpointing. Peaks and memory of common GPUs:
``GPUS`` (dense bf16 datasheet figures, each cited).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache

from posttrain.config import SAMPLE_RATE_HZ

GIB = 2**30
SAMPLES_PER_FRAME = 320  # total stride of every released feature extractor (20 ms frames)
# Activation factor (measured bytes / counted elements) per activation-checkpointing setting: fitted on
# xlsr_300m, bf16, world size 1, fwd+bwd of one clip of 4 s and of 8 s on this project's CPU machine
# (``python -m posttrain.bench fullsize --activations``); the slope of the peak RSS over the extra
# 4 audio-seconds, divided by ``activation_elements_per_second`` x 2 bytes.
ACTIVATION_FIT = {True: 1.27, False: 1.02}  # measured 22.7 and 57.3 MiB per audio-second (xlsr_300m)
DEFAULT_RESERVE_GIB = 3.0  # CUDA context (~0.5 GiB), NCCL buffers, allocator fragmentation
# A recomputed (activation-checkpointed) layer runs its forward again during the backward: a training pass
# executes 4 forward-units of FLOPs instead of 3. The model-FLOPs convention (MFU) still counts 3.
RECOMPUTE_FACTOR = 4.0 / 3.0


@dataclass(frozen=True)
class GpuSpec:
    peak_bf16_tflops: float  # dense (not 2:4 sparse) bf16 tensor throughput
    memory_gib: float


# Vendor datasheet figures, dense bf16 (the sparse figure is twice these). Memory in GB as sold, used as GiB:
# what CUDA reports as usable is a little less, which --reserve-gib covers.
GPUS: dict[str, GpuSpec] = {
    # NVIDIA H100 Tensor Core GPU datasheet: SXM5 bf16 1,979 TFLOPS with sparsity; 80 GB HBM3
    "h100-sxm": GpuSpec(989.4, 80.0),
    # same datasheet, PCIe: bf16 1,513 TFLOPS with sparsity; 80 GB HBM2e
    "h100-pcie": GpuSpec(756.5, 80.0),
    # NVIDIA H200 Tensor Core GPU datasheet: SXM bf16 1,979 TFLOPS with sparsity (the H100 SXM's die); 141 GB HBM3e
    "h200": GpuSpec(989.4, 141.0),
    # NVIDIA A100 Tensor Core GPU datasheet: bf16 312 TFLOPS (624 with sparsity); 40 GB HBM2 / 80 GB HBM2e
    "a100-40gb": GpuSpec(312.0, 40.0),
    "a100-80gb": GpuSpec(312.0, 80.0),
    # NVIDIA L40S datasheet: bf16 362.05 TFLOPS (733 with sparsity); 48 GB GDDR6
    "l40s": GpuSpec(362.05, 48.0),
    # AMD Instinct MI300X datasheet: bf16 1,307.4 TFLOPS (2,614.9 with sparsity); 192 GB HBM3
    "mi300x": GpuSpec(1307.4, 192.0),
}
DEFAULT_GPU = "h100-sxm"


@dataclass(frozen=True)
class PlanRequest:
    preset: str = "xlsr_300m"
    zero_stage: int = 2
    precision: str = "bf16"  # bf16 or fp16 (mixed, fp32 master) | fp32
    gpus: int = 8
    gpu: str = DEFAULT_GPU  # a GPUS name, for the report; gpu_memory_gib and peak_tflops carry its figures
    gpu_memory_gib: float = GPUS[DEFAULT_GPU].memory_gib
    batch_seconds: float = 100.0  # padded audio seconds per micro-batch per GPU (data.train.max_batch_seconds)
    clip_seconds: float = 4.0  # typical clip length (frames per clip, attention cost)
    sam: bool = False
    sam_variant: str = "sam"  # sam | looksam | esam
    looksam_every_steps: int = 5
    esam_data_fraction: float = 0.5  # ESAM: share of the samples in the second pass
    gradient_checkpointing: bool = True
    grad_accum_steps: int = 1
    reduce_bucket_elements: int = 200_000_000
    allgather_bucket_elements: int = 200_000_000
    overlap_comm: bool = True
    hfu: float = 0.40  # utilisation of the peak by the FLOPs executed (recomputed forwards included)
    peak_tflops: float = GPUS[DEFAULT_GPU].peak_bf16_tflops
    steps: int = 0  # 0: derived from audio_hours x epochs
    audio_hours: float = 0.0  # real audio seconds per epoch / 3600 (with steps = 0)
    epochs: float = 1.0
    reserve_gib: float = DEFAULT_RESERVE_GIB
    fused_adamw: bool = True  # training fuses AdamW on CUDA; the CPU's unfused step needs temporaries
    nodes: int = 1  # the gpus spread over this many nodes (checkpoint bytes per node)
    checkpoint_write_gbps: float = 1.0  # GB/s one node writes to the shared file system (assumed)
    checkpoint_seconds: float = 0.0  # a measured checkpoint write time (the trainer's checkpoint/write_seconds); 0: estimate
    frozen_models: int = 0  # GRPO: 1 (GRPO_s: the reference) or 2 (GRPO: reference + old policy)

    def validate(self) -> None:
        checks = [(self.zero_stage in (1, 2, 3), "zero_stage", "must be 1, 2 or 3"),
                  (self.precision in ("bf16", "fp16", "fp32"), "precision", "must be bf16, fp16 or fp32"),
                  (self.gpus >= 1, "gpus", "must be >= 1"),
                  (self.gpu_memory_gib > 0, "gpu_memory_gib", "must be > 0"),
                  (self.batch_seconds > 0, "batch_seconds", "must be > 0"),
                  (self.clip_seconds > 0, "clip_seconds", "must be > 0"),
                  (self.sam_variant in ("sam", "looksam", "esam"), "sam_variant", "must be sam, looksam or esam"),
                  (0 < self.esam_data_fraction <= 1, "esam_data_fraction", "must be in (0, 1]"),
                  (self.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1"),
                  (self.frozen_models in (0, 1, 2), "frozen_models", "must be 0, 1 (GRPO_s) or 2 (GRPO)"),
                  (0 < self.hfu <= 1, "hfu", "must be in (0, 1]"),
                  (self.peak_tflops > 0, "peak_tflops", "must be > 0"),
                  (self.steps >= 0 and self.audio_hours >= 0 and self.epochs > 0, "steps",
                   "steps and audio_hours must be >= 0, epochs > 0"),
                  (self.nodes >= 1 and self.gpus % self.nodes == 0, "nodes", "must be >= 1 and divide gpus"),
                  (self.checkpoint_write_gbps > 0, "checkpoint_write_gbps", "must be > 0"),
                  (self.checkpoint_seconds >= 0, "checkpoint_seconds", "must be >= 0")]
        for ok, key, message in checks:
            if not ok:
                raise ValueError(f"plan.{key}: {message}")


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU."""

    parameters: float
    gradients: float
    optimizer_states: float
    optimizer_step_transient: float
    sam_extra: float
    frozen_models: float
    communication_buffers: float
    activations: float
    reserve: float

    @property
    def model_states(self) -> float:
        return self.parameters + self.gradients + self.optimizer_states

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    parameters: int
    largest_layer_parameters: int
    memory: MemoryBreakdown
    activation_bytes_per_second: float
    fits: bool
    max_batch_seconds: float  # largest padded audio seconds per micro-batch per GPU that fit (0: none)
    step_seconds: float
    steps: int
    run_seconds: float
    checkpoint: "CheckpointPlan"

    @property
    def mfu(self) -> float:
        """Model-FLOPs utilisation (the usual convention: 3 forward-units a pass, no recompute counted)."""
        return self.request.hfu / recompute_factor(self.request)


@dataclass(frozen=True)
class CheckpointPlan:
    total_bytes: float  # one checkpoint, all ranks
    busiest_node_bytes: float  # what the node writing most writes (node 0 under ZeRO-1/2: the weights)
    write_seconds: float  # measured (request.checkpoint_seconds) or estimated
    measured: bool
    stop_lead_seconds: int  # sbatch --signal=B:USR1@N


# ------------------------------------------------------------------------------------------ counts


@lru_cache(maxsize=None)
def parameter_counts(preset: str) -> tuple[int, int]:
    """(trainable parameters of the detector, parameters of its largest single module), counted on a
    model built on the meta device (no memory, no initialisation cost)."""
    import torch

    from posttrain.config import ModelConfig
    from posttrain.models.detector import build_detector

    with torch.device("meta"):
        model = build_detector(ModelConfig(preset=preset))
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    return total, largest


@lru_cache(maxsize=None)
def _ssl_config(preset: str):  # transformers (and torch) load here, not at import: `plan --help` stays fast
    from posttrain.models.presets import get_preset

    return get_preset(preset).ssl_config()


def activation_elements_per_second(preset: str, gradient_checkpointing: bool, clip_seconds: float = 4.0) -> float:
    """Elements autograd keeps per audio-second in a training forward (see the module doc)."""
    from posttrain.train.flops import conv_output_lengths, frame_count

    config = _ssl_config(preset)
    num_samples = round(clip_seconds * SAMPLE_RATE_HZ)
    frames = frame_count(config, num_samples) / clip_seconds
    hidden, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    # conv outputs per second of audio: conv, norm and GELU outputs of each layer are kept
    conv = [length / clip_seconds * channels for length, channels
            in zip(conv_output_lengths(config, num_samples), config.conv_dim)]
    per_layer = 8 * hidden + 2 * ffn  # LN in/out, q k v, attention out, LN in/out, fc1 out, GELU out
    if gradient_checkpointing:
        # each checkpointed block keeps its input; one block (the largest conv layer, or one transformer
        # layer) is live again during its recompute and backward
        return sum(conv) + frames * layers * hidden + max(3 * max(conv), frames * per_layer)
    return 3 * sum(conv) + frames * layers * per_layer


def activation_bytes_per_second(request: PlanRequest) -> float:
    elements = activation_elements_per_second(request.preset, request.gradient_checkpointing, request.clip_seconds)
    # activations are 16-bit under mixed precision (the model copy is bf16/fp16), fp32 otherwise
    return elements * _bytes(request.precision) * ACTIVATION_FIT[request.gradient_checkpointing]


def _bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


# ------------------------------------------------------------------------------------------ memory


def model_state_bytes(parameters: int, largest: int, stage: int, precision: str, gpus: int) -> tuple[float, float, float]:
    """(parameters, gradients, optimiser states) bytes per GPU; see the module doc's table."""
    p, n, large = float(parameters), float(gpus), float(largest)
    if precision != "fp32":  # bf16 / fp16 mixed precision
        if stage == 3:
            return 2 * p / n + 2 * large, 4 * p / n + 2 * large, 12 * p / n
        return 2 * p, (2 * p if stage == 1 else 2 * p / n) + 4 * p / n, 12 * p / n
    if stage == 3:
        return 4 * p / n + 4 * large, 4 * p / n + 4 * large, 8 * p / n
    return 4 * p, 4 * p if stage == 1 else 4 * p / n, 8 * p / n


def params_without_gather(request: PlanRequest, parameters: int) -> float:
    """One more copy of the weights sharded as the policy's (its gather buffer is the policy's, reused)."""
    weights = _bytes(request.precision) * parameters
    return weights / request.gpus if request.zero_stage == 3 else weights


def optimizer_step_bytes(request: PlanRequest, parameters: int) -> float:
    """Temporaries of the AdamW update on the owned fp32 partition: none for the fused kernel (CUDA);
    torch's unfused update builds ``exp_avg_sq.sqrt()`` and its quotient (two partition-sized fp32
    tensors) at once."""
    owned = parameters / request.gpus
    return 0.0 if request.fused_adamw else 2 * 4 * owned


def sam_extra_bytes(request: PlanRequest, parameters: int) -> float:
    if not request.sam:
        return 0.0
    owned = parameters / request.gpus if request.zero_stage > 0 else parameters
    extra = 4 * owned if (request.zero_stage == 3 and request.precision == "fp32") else 0.0
    return extra + (4 * owned if request.sam_variant == "looksam" else 0.0)


def communication_bytes(request: PlanRequest) -> float:
    """ZeRO's flat gradient reduce bucket (``contiguous_gradients``); ZeRO-1/2 keep two in flight with
    ``overlap_comm``. All-gathers write into the parameters' own storage: no buffer of their own."""
    in_flight = 2 if (request.overlap_comm and request.zero_stage < 3) else 1
    return request.reduce_bucket_elements * in_flight * _bytes(request.precision)


def memory_breakdown(request: PlanRequest, batch_seconds: float | None = None) -> MemoryBreakdown:
    parameters, largest = parameter_counts(request.preset)
    params, grads, optim = model_state_bytes(parameters, largest, request.zero_stage, request.precision, request.gpus)
    seconds = request.batch_seconds if batch_seconds is None else batch_seconds
    return MemoryBreakdown(parameters=params, gradients=grads, optimizer_states=optim,
                           optimizer_step_transient=optimizer_step_bytes(request, parameters),
                           sam_extra=sam_extra_bytes(request, parameters),
                           frozen_models=request.frozen_models * params_without_gather(request, parameters),
                           communication_buffers=communication_bytes(request),
                           activations=seconds * activation_bytes_per_second(request),
                           reserve=request.reserve_gib * GIB)


# -------------------------------------------------------------------------------------------- time


def recompute_factor(request: PlanRequest) -> float:
    """Executed FLOPs per model FLOP: activation checkpointing runs each forward again in the backward."""
    return RECOMPUTE_FACTOR if request.gradient_checkpointing else 1.0


def step_seconds(request: PlanRequest, batch_seconds: float | None = None) -> float:
    """Expected optimiser-step time at ``request.hfu`` of the peak, the recomputed forward counted:
    every GPU trains its micro-batches in parallel."""
    from posttrain.train.flops import training_flops_per_audio_second

    seconds = (request.batch_seconds if batch_seconds is None else batch_seconds) * request.grad_accum_steps
    flops = training_flops_per_audio_second(_ssl_config(request.preset), request.clip_seconds) * seconds
    flops *= sam_pass_factor(request) * recompute_factor(request) + request.frozen_models / 3.0
    return flops / (request.hfu * request.peak_tflops * 1e12)


def sam_pass_factor(request: PlanRequest) -> float:
    """Training FLOPs of a step in units of a plain step's: a full SAM step is two forward/backward
    passes, LookSAM does one every k steps, ESAM one no-grad forward (1/3 of a training pass) plus a
    second pass on ``esam_data_fraction`` of the samples."""
    if not request.sam:
        return 1.0
    if request.sam_variant == "esam":
        return 1.0 + 1.0 / 3.0 + request.esam_data_fraction
    return 1.0 + (1.0 if request.sam_variant == "sam" else 1.0 / request.looksam_every_steps)


def checkpoint_plan(request: PlanRequest, parameters: int, step: float) -> CheckpointPlan:
    """Bytes and time of one checkpoint, and the signal lead time a stop on the scheduler's warning needs;
    see the module doc."""
    # GRPO's old policy is saved with the policy's weights, sharded alike
    weights = _bytes(request.precision) * parameters * (2 if request.frozen_models == 2 else 1)
    optimiser = 12 * parameters
    per_node_optimiser = optimiser / request.nodes
    busiest = (weights + optimiser) / request.nodes if request.zero_stage == 3 else weights + per_node_optimiser
    measured = request.checkpoint_seconds > 0
    write = request.checkpoint_seconds if measured else busiest / (request.checkpoint_write_gbps * 1e9)
    lead = max(60, 10 * math.ceil((1.5 * (step + write) + 30) / 10))
    return CheckpointPlan(total_bytes=weights + optimiser, busiest_node_bytes=busiest, write_seconds=write,
                          measured=measured, stop_lead_seconds=lead)


def planned_steps(request: PlanRequest) -> int:
    if request.steps:
        return request.steps
    per_step = request.batch_seconds * request.grad_accum_steps * request.gpus
    return math.ceil(request.audio_hours * 3600 * request.epochs / per_step)


def plan(request: PlanRequest) -> Plan:
    request.validate()
    parameters, largest = parameter_counts(request.preset)
    memory = memory_breakdown(request)
    per_second = activation_bytes_per_second(request)
    budget = request.gpu_memory_gib * GIB
    fixed = memory.total - memory.activations
    max_seconds = max(0.0, math.floor((budget - fixed) / per_second)) if per_second > 0 else math.inf
    step = step_seconds(request)
    steps = planned_steps(request)
    return Plan(request=request, parameters=parameters, largest_layer_parameters=largest, memory=memory,
                activation_bytes_per_second=per_second, fits=memory.total <= budget, max_batch_seconds=max_seconds,
                step_seconds=step, steps=steps, run_seconds=steps * step,
                checkpoint=checkpoint_plan(request, parameters, step))


def format_plan(result: Plan) -> str:
    r, m = result.request, result.memory
    gib = lambda value: f"{value / GIB:8.2f} GiB"  # noqa: E731
    sam = f"{r.sam_variant}" if r.sam else "off"
    lines = [
        f"preset {r.preset}: {result.parameters:,} parameters (largest module {result.largest_layer_parameters:,})",
        f"{r.gpus} GPU(s) ({r.gpu}) x {r.gpu_memory_gib:g} GiB, ZeRO-{r.zero_stage}, {r.precision}, SAM {sam}, "
        f"activation checkpointing {'on' if r.gradient_checkpointing else 'off'}, "
        f"{r.batch_seconds:g} padded audio-s per micro-batch x {r.grad_accum_steps} accumulation",
        "memory per GPU:",
        f"  parameters             {gib(m.parameters)}",
        f"  gradients              {gib(m.gradients)}",
        f"  optimiser states       {gib(m.optimizer_states)}",
        f"  optimiser step temps   {gib(m.optimizer_step_transient)}",
        f"  SAM extra copy         {gib(m.sam_extra)}",
        f"  GRPO frozen models     {gib(m.frozen_models)}  ({r.frozen_models}: reference"
        f"{' + old policy' if r.frozen_models == 2 else ''})" if r.frozen_models else
        "  GRPO frozen models         0.00 GiB  (no GRPO)",
        f"  communication buffers  {gib(m.communication_buffers)}",
        f"  activations            {gib(m.activations)}  ({result.activation_bytes_per_second / 2**20:.1f} MiB per "
        f"audio-second)",
        f"  reserve                {gib(m.reserve)}  (CUDA context, NCCL, fragmentation)",
        f"  total                  {gib(m.total)}  of {r.gpu_memory_gib:g} GiB: "
        + ("fits" if result.fits else "DOES NOT FIT"),
        f"largest batch that fits: {result.max_batch_seconds:g} padded audio-seconds per micro-batch per GPU",
        f"step time at {100 * r.hfu:.0f} % of {r.peak_tflops:g} TFLOP/s (dense bf16) for the FLOPs executed"
        + (" (the recomputed forward included)" if r.gradient_checkpointing else "")
        + f": {result.step_seconds:.3f} s, MFU {100 * result.mfu:.0f} % "
        f"({r.batch_seconds * r.grad_accum_steps * r.gpus / result.step_seconds:,.0f} audio-s/s over all GPUs)",
    ]
    if result.steps:
        lines.append(f"run: {result.steps:,} steps x {result.step_seconds:.3f} s = {result.run_seconds / 3600:,.1f} h "
                     f"wall ({result.run_seconds * r.gpus / 3600:,.0f} GPU-hours)")
    c = result.checkpoint
    how = "measured" if c.measured else f"at {r.checkpoint_write_gbps:g} GB/s per node (--checkpoint-write-gbps)"
    lines += [f"checkpoint: {c.total_bytes / 1e9:,.1f} GB, the busiest of {r.nodes} node(s) writes "
              f"{c.busiest_node_bytes / 1e9:,.1f} GB: {c.write_seconds:,.0f} s {how}",
              f"stop on the scheduler's warning (one step + one checkpoint, 1.5x + 30 s): "
              f"sbatch --signal=B:USR1@{c.stop_lead_seconds}"]
    return "\n".join(lines)
