"""``ZOConfig``: every zeroth-order setting, validated before any weight changes."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .core.noise import DISTRIBUTIONS, GAUSSIAN_BLOCK
from .core.registry import BACKENDS, ESTIMATORS, UPDATE_RULES

__all__ = [
    "ZOConfig",
    "DROPOUT_MODES",
    "PERTURBATION_MODES",
    "SPARSITY_MODES",
    "SPARSITY_THRESHOLDS",
    "HESSIAN_ESTIMATES",
    "BLOCK_WISE",
    "GAUSSIAN_STREAMS",
    "QUANTIZED_MODES",
]

DROPOUT_MODES = ("same-masks", "eval")
PERTURBATION_MODES = ("auto", "in-place", "out-of-place")
SPARSITY_MODES = ("magnitude", "random")
SPARSITY_THRESHOLDS = ("initial", "per-step")
HESSIAN_ESTIMATES = ("paper", "code")
BLOCK_WISE = ("cycle", "random")
GAUSSIAN_STREAMS = ("auto", "philox", "native")
SCHEDULES = ("auto", "per-forward", "one-visit")
OFFLOAD_MODES = ("cpu", "disk")
DIRECTIONS = (*DISTRIBUTIONS, "sphere")
QUANTIZED_MODES = ("auto", "scales", "adapters", "none")  # zo_plugins.quant.QUANTIZED_MODES


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class ZOConfig:
    """Settings of a zeroth-order (SPSA / MeZO-style) optimiser.

    Every field carries a help string (``ZOConfig.help()`` prints them).  Invalid values
    raise ``ValueError`` naming the field, the value and the valid range.
    """

    eps: float = _help(
        1e-3,
        "Perturbation scale epsilon: the loss is probed at theta + eps*z and theta - eps*z. "
        "MeZO uses 1e-3 for full-parameter runs, 1e-2 for LoRA and 1e-1 for prefix tuning.",
    )
    seed: int = _help(
        0,
        "Base seed. The direction of optimizer step t is a pure function of (seed, t, "
        "parameter name, element offset); the process-global RNG is never reseeded.",
    )
    n_queries: int = _help(
        1,
        "Directions averaged per optimizer step (each costs two forwards). Directions are "
        "regenerated from their seeds, never stored.",
    )
    distribution: str = _help(
        "gaussian",
        "Direction distribution: 'gaussian' (MeZO), 'rademacher' (+/-1, the cheapest to "
        "generate and bit-identical across backends) or 'sphere' (uniform on the sphere of "
        "radius sqrt(D) over the D perturbed coordinates: the Gaussian direction normalised, "
        "one extra generation pass per direction; eps and lr keep their Gaussian meaning).",
    )
    estimator: str = _help(
        "spsa",
        "How the projected gradient is estimated. 'spsa': two-point central difference "
        "(L(θ+εz) - L(θ-εz))/2ε, MeZO. 'forward': one-point forward difference "
        "(L(θ+εz) - L(θ))/ε, the unperturbed loss shared by all n_queries directions "
        "(n_queries + 1 forwards). 'forward-grad': the exact directional derivative ∇L·z by "
        "forward-mode AD (torch.func / dual numbers): one pass per direction, measured at ~5x the "
        "time and ~2.3x the peak memory growth of a plain forward on SmolLM2-135M (CPU). "
        "'cge': coordinate-wise estimation (DeepZero) of cge_coordinates random coordinates "
        "per step. 'rank': ZO-RankSGD, only a ranking of n_queries candidates θ+εz_j is used. "
        "'fzoo': FZOO, n_queries >= 2 one-sided probes L(θ+εz_i) and the unperturbed L(θ) "
        "(n_queries + 1 forwards, or one batched pass with batched_copies), the step divided "
        "by the spread of the probed losses; the paper uses N = 8 Rademacher directions. "
        "'hizoo': HiZOO's probes L(θ), L(θ ± ε H^-1/2 z) (3 forwards) for optimizer='hizoo'.",
    )
    optimizer: str = _help(
        "zo-sgd",
        "Update rule applied to the estimated gradient d = mean_q g_q z_q: 'zo-sgd' "
        "(θ -= lr (d + wd θ)); 'zo-sgd-momentum' (m = β m + d; θ -= lr (m + wd θ); "
        "4 bytes/parameter of state, or none with momentum_history > 0); 'zo-sgd-sign' "
        "(θ -= lr (sign(d) + wd θ), the element-wise sign of the estimate); "
        "'zo-sgd-conservative' (ZO-Bench: the step is kept only if the loss at the updated "
        "weights, probed without writing them, is not worse; one extra forward); 'zo-adam' "
        "(Adam moments on d with decoupled weight decay; 8 bytes/parameter of state); "
        "'hizoo' (HiZOO, with estimator='hizoo': a diagonal Hessian estimate H, an EMA updated "
        "from the extra forward, preconditions the probes and the step, θ -= lr (g H^-1/2 z + wd θ); "
        "4 bytes/parameter of state, one float32 buffer the size of the trainable set).",
    )
    momentum: float = _help(0.9, "Momentum coefficient β of 'zo-sgd-momentum', in [0, 1).")
    momentum_history: int = _help(
        0,
        "0: 'zo-sgd-momentum' keeps a float32 momentum buffer (4 bytes/parameter). K > 0: no "
        "buffer; the momentum is rebuilt each step from the last K steps' (seed, g), "
        "truncating the series β^k after K terms (K extra direction generations per pass).",
    )
    betas: tuple[float, float] = _help((0.9, 0.999), "Adam's (β1, β2) for 'zo-adam', each in [0, 1).")
    adam_eps: float = _help(1e-8, "Adam's denominator epsilon for 'zo-adam', > 0.")
    cge_coordinates: int = _help(
        16, "Coordinates estimated per step by estimator='cge' (2 forwards each), drawn from the step seed."
    )
    sparsity: float = _help(
        0.0,
        "Sparse MeZO: the fraction of each tensor left unperturbed and not updated, in [0, 1); "
        "0 is dense. The mask is computed on the fly, never stored.",
    )
    sparsity_mode: str = _help(
        "magnitude",
        "'magnitude': perturb the (1 - sparsity) fraction of each tensor with the smallest "
        "|θ| (Sparse MeZO; the per-tensor threshold is the quantile of a 65,536-element keyed "
        "sample of |θ|, recomputed each step; needs out-of-place perturbation so every pass sees "
        "the same unperturbed θ). 'random': a keyed random mask, resampled every "
        "sparsity_resample_every steps.",
    )
    sparsity_threshold: str = _help(
        "initial",
        "How sparsity_mode='magnitude' sets each tensor's threshold h. 'initial' (Sparse MeZO as "
        "its paper defines it): h is the exact (1 - sparsity) quantile of |θ| at the first step "
        "(the pretrained weights), kept for the whole run (checkpointed), and the mask |θ| <= h "
        "is re-evaluated on the current weights every step, so the perturbed fraction follows "
        "the weights. 'per-step': h is re-estimated every step from a 65,536-element keyed "
        "sample of the current |θ|, which keeps the fraction fixed.",
    )
    sparsity_resample_every: int = _help(1, "Steps between resamplings of the random sparsity mask, >= 1.")
    hessian_smooth: float = _help(
        1e-6,
        "HiZOO's smoothing α in [0, 1): H <- (1 - α) H + α |Ĥ| each step (the paper's "
        "'Hessian smooth'; 0 keeps H = 1, plain MeZO with one extra forward).",
    )
    hessian_estimate: str = _help(
        "paper",
        "HiZOO's per-step diagonal estimate Ĥ from ΔL = L(θ+εH^-1/2 z) + L(θ-εH^-1/2 z) - 2L(θ). "
        "'paper': Ĥ = ΔL/(2ε²) · H (z² - 1), unbiased for the diagonal of the Hessian on a "
        "quadratic. 'code': Ĥ = |ΔL|/(2ε²) · H z², what the authors' released code computes.",
    )
    batched_copies: bool = _help(
        False,
        "estimator='fzoo' with ZOOptimizer.step: evaluate the n_queries + 1 probes in ONE closure "
        "call whose batch dimension carries the copies. The closure takes copies (int) and "
        "returns a tensor of copies losses, its batch repeated copies times along dim 0 (copy k "
        "in rows k*B..(k+1)*B); each module holding trainable tensors computes copy k with "
        "θ + ε z_k (nn.Linear in one batched matmul, other modules copy by copy).",
    )
    block_wise: str | None = _help(
        None,
        "Block-wise descent (ZO-Bench): perturb and update one block per step, a block being a "
        "transformer layer (parameters sharing the name prefix up to their first numeric index) "
        "or a tensor outside any layer. None: all at once; 'cycle': blocks in order; 'random': "
        "a block drawn from the step seed.",
    )
    maximize: bool = _help(
        False, "Maximise what the closure returns (an accuracy, a reward) instead of minimising it."
    )
    dropout: str = _help(
        "same-masks",
        "'same-masks': the RNG state is saved before the first perturbed forward and restored "
        "before the second, so both see the same dropout masks (the difference of the two "
        "losses then measures only the perturbation). 'eval': the model is switched to "
        "eval() for the two forwards, as the MeZO reference does.",
    )
    perturbation: str = _help(
        "auto",
        "'out-of-place': a forward pre-hook hands each module theta + eps*z and the weights "
        "are written only by the update, so a step with lr=0 or a skipped step leaves them "
        "bit-identical in every dtype; costs a transient copy of one module's trainable "
        "tensors. 'in-place': theta is perturbed in place in bounded chunks (the least "
        "memory; float32 round trips drift by a few ulp; refused for fp16/bf16, where they "
        "drift 20-150x a MeZO update). 'auto': out-of-place whenever the model is known (every "
        "integration; exact in every dtype, and no exception or Ctrl-C leaves the weights "
        "perturbed), in-place when only tensors are given.",
    )
    backend: str = _help(
        "auto",
        "Where the passes run: 'auto' (Triton kernels on CUDA when triton imports, PyTorch "
        "otherwise), 'triton' (raises with the pip install line if triton is missing), or "
        "'torch'. Every update rule runs in the fused kernels; user masks and random sparsity "
        "masks run on the PyTorch passes.",
    )
    gaussian_stream: str = _help(
        "auto",
        "Which Gaussian stream 'gaussian' directions draw from. 'philox': Philox-4x32 + "
        "Box-Muller from (seed, tensor, element), the same stream on the Triton kernels and the "
        "PyTorch passes, on every device (up to last-ulp differences of log/cos); in PyTorch ops "
        "it costs ~10x a native normal_ on CPU. 'native': blocks of 65536 normals from the "
        "device's own generator (fast on CPU, but CPU and CUDA streams differ and the Triton "
        "kernels cannot draw it). 'auto': 'philox' with the Triton backend or CUDA tensors, "
        "'native' on CPU with the PyTorch backend.",
    )
    stochastic_rounding: bool = _help(
        True,
        "Round updates of bf16/fp16 weights stochastically (unbiased), so updates smaller "
        "than half an ulp are applied on average instead of being lost.",
    )
    all_reduce: bool = _help(
        True,
        "When torch.distributed is initialised, average the projected gradient (one scalar "
        "per direction) over all ranks before the update.",
    )
    perturbation_parallel: bool = _help(
        False,
        "Perturbation parallelism (DistZO2): with 2k processes, ranks 2p and 2p+1 form pair p and "
        "evaluate theta + eps*z and theta - eps*z on the same batch at the same time (one forward per "
        "rank instead of two); one all-reduce of a few float64 values per optimizer step exchanges the "
        "losses and every rank applies the same update. The k pairs are data parallel: shard the data "
        "per pair (ZODDPStrategy and ZOTrainer do; zo_plugins.distributed.pair_sampler for your own "
        "loop). estimator='spsa' only.",
    )
    clip_projected_grad: float | None = _help(
        None,
        "Clip the projected gradient to [-c, c] before the update (QZO's directional-derivative "
        "clipping), guarding against exploding estimates; None disables. Clipped steps are "
        "counted (ZOOptimizer.clipped_steps, logged as zo_clipped_steps).",
    )
    quantized: str = _help(
        "auto",
        "What trains on a quantized model (torchao weight-only tensors, bitsandbytes 4-bit / 8-bit "
        "layers; docs/quantized.md). 'scales': the continuous quantization scales (and floating zero "
        "points) of every quantized layer, QZO-style; the integer codes never change. 'adapters': the "
        "PEFT adapters only (a ZO QLoRA). 'auto': 'adapters' when the model carries PEFT adapters, "
        "'scales' when it is quantized and has none, otherwise the tensors that require grad. 'none': "
        "the tensors that require grad, quantization ignored.",
    )
    trajectory_path: str | None = _help(
        None,
        "Write the run's trajectory (per step: seed, projected gradient, lr, weight decay) to "
        "this JSON-lines file; zo_plugins.replay rebuilds the weights from it bit for bit.",
    )
    chunk_size: int = _help(
        1 << 20,
        "Elements per chunk when directions are generated on the PyTorch path; bounds the "
        "extra memory of a pass (4 bytes per element). A multiple of 65536.",
    )
    schedule: str = _help(
        "auto",
        "How the two perturbed forwards of a step run. 'per-forward': one forward per "
        "perturbation (three generations of each direction per step). 'one-visit': both in one "
        "pass over the model on a doubled batch, each transformer block running its forward "
        "twice with its two perturbed copies (ZO2's schedule: two generations per step, each block "
        "visited once; activations of 2x the batch; needs a Hugging Face model whose loss the "
        "closure returns, else falls back with a logged reason). 'auto': 'one-visit' with "
        "offload, 'per-forward' otherwise.",
    )
    offload: str | None = _help(
        None,
        "Keep the transformer blocks out of the model's device: 'cpu' (pinned CPU memory, "
        "copied to the GPU on each visit) or 'disk' (memory-mapped safetensors files under "
        "offload_dir; resident memory a couple of blocks). Each block is visited once per step "
        "and its previous update applied on arrival. Needs the model, an nn.ModuleList of "
        "blocks, and a linear update rule (zo-sgd, stateless momentum).",
    )
    offload_dir: str | None = _help(None, "Folder for the block files of offload='disk'.")

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        _check_positive_float("eps", self.eps)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"ZOConfig.seed={self.seed!r} is invalid: use an integer >= 0.")
        if not isinstance(self.n_queries, int) or isinstance(self.n_queries, bool) or self.n_queries < 1:
            raise ValueError(
                f"ZOConfig.n_queries={self.n_queries!r} is invalid: use an integer >= 1 "
                "(1 is MeZO's setting)."
            )
        _check_choice("distribution", self.distribution, DIRECTIONS)
        _check_choice("estimator", self.estimator, tuple(ESTIMATORS))
        _check_choice("optimizer", self.optimizer, tuple(UPDATE_RULES))
        _check_choice("sparsity_mode", self.sparsity_mode, SPARSITY_MODES)
        if self.block_wise is not None:
            _check_choice("block_wise", self.block_wise, BLOCK_WISE)
        _check_unit("momentum", self.momentum)
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2):
            raise ValueError(
                f"ZOConfig.betas={self.betas!r} is invalid: use two numbers in [0, 1), e.g. (0.9, 0.999)."
            )
        for b in self.betas:
            _check_unit("betas", b)
        _check_positive_float("adam_eps", self.adam_eps)
        _check_int("momentum_history", self.momentum_history, 0)
        _check_int("cge_coordinates", self.cge_coordinates, 1)
        _check_int("sparsity_resample_every", self.sparsity_resample_every, 1)
        _check_unit("sparsity", self.sparsity)
        if not isinstance(self.maximize, bool):
            raise ValueError(f"ZOConfig.maximize={self.maximize!r} is invalid: use True or False.")
        if self.estimator == "rank" and self.n_queries < 2:
            raise ValueError(
                f"estimator='rank' ranks n_queries candidates; n_queries={self.n_queries} is too few: use >= 2."
            )
        if self.estimator == "cge" and self.optimizer != "zo-sgd":
            raise ValueError(
                f"estimator='cge' updates single coordinates and supports optimizer='zo-sgd' only, "
                f"not {self.optimizer!r}."
            )
        if self.sparsity and self.sparsity_mode == "magnitude" and self.perturbation == "in-place":
            raise ValueError(
                "sparsity_mode='magnitude' needs every pass to see the unperturbed weights: use "
                "perturbation='out-of-place' or 'auto' (not 'in-place'), or sparsity_mode='random'."
            )
        _check_choice("dropout", self.dropout, DROPOUT_MODES)
        _check_choice("perturbation", self.perturbation, PERTURBATION_MODES)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("gaussian_stream", self.gaussian_stream, GAUSSIAN_STREAMS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        if self.offload is not None:
            _check_choice("offload", self.offload, OFFLOAD_MODES)
            if self.offload == "disk" and not self.offload_dir:
                raise ValueError(
                    "ZOConfig.offload='disk' needs offload_dir: the folder for the block files, e.g. "
                    "ZOConfig(offload='disk', offload_dir='/scratch/zo-blocks')."
                )
            if self.schedule == "per-forward":
                raise ValueError(
                    "ZOConfig.offload needs schedule='one-visit' or 'auto' (each block visited once per step), "
                    "not 'per-forward'."
                )
            bad = self.optimizer not in ("zo-sgd",) and not (
                self.optimizer == "zo-sgd-momentum" and self.momentum_history > 0
            )
            if bad:
                raise ValueError(
                    f"ZOConfig.offload supports the linear update rules (optimizer='zo-sgd', or "
                    f"'zo-sgd-momentum' with momentum_history > 0), not optimizer={self.optimizer!r}: their "
                    "state would have to be offloaded too."
                )
            if self.sparsity or self.block_wise is not None:
                raise ValueError(
                    "ZOConfig.offload applies each step's update when the block next arrives, under the next "
                    "step's masks: sparsity and block_wise are not supported with it."
                )
        if self.offload_dir is not None:
            if not isinstance(self.offload_dir, (str, os.PathLike)):
                raise ValueError(
                    f"ZOConfig.offload_dir={self.offload_dir!r} is invalid: use a folder path or None."
                )
            self.offload_dir = os.fspath(self.offload_dir)
        _check_choice("quantized", self.quantized, QUANTIZED_MODES)
        if self.gaussian_stream == "native" and self.backend == "triton":
            raise ValueError(
                "gaussian_stream='native' is the PyTorch generator's stream, which the Triton "
                "kernels cannot draw: use gaussian_stream='philox' (or 'auto') with backend='triton', "
                "or backend='torch'."
            )
        for name in ("stochastic_rounding", "all_reduce", "perturbation_parallel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ZOConfig.{name}={getattr(self, name)!r} is invalid: use True or False.")
        if self.perturbation_parallel is True:
            _check_perturbation_parallel(self)
        if self.clip_projected_grad is not None:
            c = self.clip_projected_grad
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
                raise ValueError(
                    f"ZOConfig.clip_projected_grad={c!r} is invalid: use a finite number > 0, or None "
                    "to disable clipping."
                )
        if self.trajectory_path is not None and not isinstance(self.trajectory_path, (str, os.PathLike)):
            raise ValueError(
                f"ZOConfig.trajectory_path={self.trajectory_path!r} is invalid: use a file path or None."
            )
        if self.trajectory_path is not None:
            self.trajectory_path = os.fspath(self.trajectory_path)
        _check_choice("sparsity_threshold", self.sparsity_threshold, SPARSITY_THRESHOLDS)
        _check_unit("hessian_smooth", self.hessian_smooth)
        _check_choice("hessian_estimate", self.hessian_estimate, HESSIAN_ESTIMATES)
        if not isinstance(self.batched_copies, bool):
            raise ValueError(
                f"ZOConfig.batched_copies={self.batched_copies!r} is invalid: use True or False."
            )
        if self.batched_copies and not ESTIMATORS[self.estimator].batched_copies:
            able = [n for n, e in ESTIMATORS.items() if e.batched_copies]
            raise ValueError(
                f"ZOConfig.batched_copies=True: estimator={self.estimator!r} evaluates its probes one "
                f"forward at a time; batched copies serve estimator={' or '.join(map(repr, able))}."
            )
        # what a registered method cannot serve (core.estimators / core.updates say why)
        for entry in (ESTIMATORS[self.estimator], UPDATE_RULES[self.optimizer]):
            if entry.validate is not None:
                entry.validate(self)
        if (
            not isinstance(self.chunk_size, int)
            or self.chunk_size < GAUSSIAN_BLOCK
            or self.chunk_size % GAUSSIAN_BLOCK
        ):
            raise ValueError(
                f"ZOConfig.chunk_size={self.chunk_size!r} is invalid: use a positive multiple "
                f"of {GAUSSIAN_BLOCK}, e.g. {1 << 20}."
            )

    # ------------------------------------------------------------------ helpers
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> tuple[ZOConfig, dict[str, Any]]:
        """Split ``kwargs`` into a ``ZOConfig`` and the keys that are not ZO fields."""
        names = set(cls.field_names())
        ours = {k: v for k, v in kwargs.items() if k in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        return cls(**ours), rest

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def help(cls) -> str:
        return "\n".join(f"{f.name} (default {f.default!r}): {f.metadata['help']}" for f in fields(cls))


def _check_positive_float(name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"ZOConfig.{name}={value!r} is invalid: use a finite number > 0 (MeZO uses 1e-3).")


def _check_unit(name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0 <= value < 1):
        raise ValueError(f"ZOConfig.{name}={value!r} is invalid: use a number in [0, 1).")


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"ZOConfig.{name}={value!r} is invalid: use an integer >= {low}.")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"ZOConfig.{name}={value!r} is not valid: choose one of {', '.join(map(repr, choices))}."
        )


def _check_perturbation_parallel(cfg: ZOConfig) -> None:
    if cfg.estimator != "spsa":
        raise ValueError(
            f"ZOConfig.perturbation_parallel=True splits the two forwards of estimator='spsa' between two "
            f"ranks; estimator={cfg.estimator!r} has no such pair. Use estimator='spsa' or "
            "perturbation_parallel=False."
        )
    if cfg.optimizer == "zo-sgd-conservative":
        raise ValueError(
            "ZOConfig.perturbation_parallel=True cannot run optimizer='zo-sgd-conservative': its extra probe of "
            "the candidate update would run on one rank of each pair only. Use another update rule."
        )
    if not cfg.all_reduce:
        raise ValueError(
            "ZOConfig.perturbation_parallel=True needs all_reduce=True: the pairs' two losses are exchanged by "
            "that all-reduce."
        )
    if cfg.offload is not None or cfg.schedule == "one-visit":
        raise ValueError(
            f"ZOConfig.perturbation_parallel=True runs one perturbed forward per rank; "
            f"{'offload=' + repr(cfg.offload) if cfg.offload is not None else 'schedule=' + repr(cfg.schedule)} "
            "runs both forwards in one visit of each block. Use one or the other "
            "(perturbation_parallel=False, or schedule='auto' without offload)."
        )
