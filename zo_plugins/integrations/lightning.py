"""Lightning 2.6 integration: ``ZOStrategy``, ``ZODDPStrategy`` and ``ZOLightningCallback``.

An unchanged ``LightningModule`` whose ``training_step`` returns a loss trains with ZO:
``L.Trainer(strategy=ZOStrategy(eps=1e-3))``.  The strategy is the one place Lightning runs
the user's ``training_step`` (inside the precision context and, under DDP, the forward
redirection), so ``ZOMixin`` takes over three methods and no loop is forked:

* ``training_step`` runs the user's ``training_step`` twice per direction under ``no_grad``
  through ``ZOOptimizer.estimate`` and returns ``leaf.clone()`` as the loss, ``leaf`` a fresh
  scalar that requires grad.  Lightning divides it by ``accumulate_grad_batches`` and calls
  ``backward``.
* ``backward`` keeps the precision plugin's hooks (``on_before_backward`` /
  ``on_after_backward``) and back-propagates through that scalar only: a hook on ``leaf``
  receives the factor Lightning would have back-propagated (``1/accumulate_grad_batches``,
  times the loss scale under ``16-mixed``), and ``factor * g`` is accumulated.  No parameter
  is in the graph, so no ``.grad`` is ever allocated.
* ``optimizer_step`` runs Lightning's closure through the precision plugin's
  ``_wrap_closure`` (so ``on_before_optimizer_step`` and gradient clipping hooks fire),
  all-reduces the accumulated scalar(s), copies ``lr`` / ``weight_decay`` from the user's
  optimizer param groups (schedulers from ``configure_optimizers`` apply) and lets the core
  apply the update.  The user's ``optimizer.step()`` is then called; it finds no ``.grad``
  and does nothing but keeps ``lr_scheduler`` bookkeeping quiet.  The scheduler is stepped
  by Lightning afterwards, as usual.

The step index is ``trainer.global_step`` (optimizer steps), so every micro-batch of one
optimizer step uses the same directions, all ranks agree, and a resumed run continues the
exact direction sequence.

Logging: what the user's ``training_step`` passes to ``self.log`` during the perturbed calls
is captured and logged once per micro-batch, with numeric values averaged over the perturbed
calls (``(f(theta + eps z) + f(theta - eps z)) / 2 = f(theta) + O(eps^2)``).  The strategy
logs ``projected_grad``, ``loss_plus`` and ``loss_minus`` once per optimizer step.
"""

from __future__ import annotations

import inspect
import logging
import math
import types
import typing
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import (
        DDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
        StrategyRegistry,
    )
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        "zo_plugins.lightning needs Lightning: pip install 'zo-plugins[lightning]' "
        "(or pip install 'lightning>=2.6')."
    ) from e

from ..config import ZOConfig
from ..core.optimizer import ZOOptimizer
from .driver import ZODriver

__all__ = ["ZOMixin", "ZOStrategy", "ZODDPStrategy", "ZOModelParallelStrategy", "ZOLightningCallback"]

logger = logging.getLogger("zo_plugins")

ZO_CHECKPOINT_KEY = "zo_plugins"


def _extract_loss(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and output.get("loss") is not None:
        return output["loss"]
    raise RuntimeError(
        "ZOStrategy: training_step must return the loss as a tensor or a dict with a 'loss' key; "
        f"it returned {type(output).__name__}."
    )


def _replace_loss(output: Any, loss: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return loss
    out = dict(output)
    out["loss"] = loss
    return out


class _LogCapture:
    """Captures ``LightningModule.log`` calls made during the perturbed ``training_step`` calls
    and logs each key once afterwards.

    Numeric values (floats, ints, scalar tensors) are averaged over the perturbed calls;
    anything else (e.g. a torchmetrics ``Metric``) is logged as the last call left it.
    The instance attribute ``log`` is set only while a call runs and removed afterwards.
    """

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module
        self.calls: list[dict[str, tuple[Any, tuple, dict]]] = []

    @contextmanager
    def capture(self):
        record: dict[str, tuple[Any, tuple, dict]] = {}
        self.calls.append(record)

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            record[name] = (value, args, kwargs)

        had = "log" in self.module.__dict__
        old = self.module.__dict__.get("log")
        self.module.log = log  # type: ignore[method-assign]
        try:
            yield
        finally:
            if had:
                self.module.log = old  # type: ignore[method-assign]
            else:
                del self.module.log

    def replay(self, n_calls: int) -> None:
        """Log what the last ``n_calls`` calls (the perturbed ones) logged; earlier calls (the
        core's one-time check of the closure on unperturbed weights) are dropped."""
        calls = self.calls[-n_calls:] if n_calls else []
        if not calls:
            return
        for name, (_, args, kwargs) in calls[-1].items():
            values = [c[name][0] for c in calls if name in c]
            self.module.log(name, _mean_value(values), *args, **kwargs)
        self.calls.clear()


def _is_number(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.dtype == torch.bool
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mean_value(values: list[Any]) -> Any:
    if len(values) > 1 and all(_is_number(v) for v in values):
        if isinstance(values[-1], torch.Tensor):
            stacked = torch.stack([torch.as_tensor(v).detach().float().reshape(()) for v in values])
            return stacked.mean()
        return sum(float(v) for v in values) / len(values)
    return values[-1]


class ZOMixin:
    """Turns a Lightning ``Strategy`` into a zeroth-order one (see the module docstring).

    Mixed in front of ``SingleDeviceStrategy`` (``ZOStrategy``) or ``DDPStrategy``
    (``ZODDPStrategy``); ``ZOLightningCallback`` mixes it into the Trainer's own strategy.
    Everything not specific to Lightning's loop (accumulation, the loss-scale factor, the
    conservative probe, abort safety, the checkpointed optimizer state) is
    ``integrations.driver.ZODriver``.
    """

    zo_config: ZOConfig
    zo_driver: ZODriver

    def _zo_init(self, config: ZOConfig, base: type, **driver_kwargs: Any) -> None:
        # The stock strategy class whose methods this one extends. Called explicitly instead of
        # super() so ZOLightningCallback can bind these methods onto an existing strategy.
        self._zo_base = base
        self.zo_config = config
        self.zo_driver = ZODriver(config, owner=type(self).__name__, **driver_kwargs)
        self._zo_loaded: dict[str, Any] | None = None
        self._zo_step_started: int | None = None
        self.zo_optimizer: ZOOptimizer | None = None
        """The ``ZOOptimizer`` of the current fit (None outside ``fit``)."""

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer) -> None:
        self._zo_base.setup(self, trainer)
        self.zo_driver.optimizer = self.zo_optimizer = None
        if trainer.state.fn == "fit":
            self._zo_build(trainer)

    def _zo_build(self, trainer: pl.Trainer) -> None:
        module = self.lightning_module  # type: ignore[attr-defined]
        if not module.automatic_optimization:
            raise ValueError(
                "ZO strategies need automatic optimization: remove `self.automatic_optimization = False` "
                "(the strategy runs the forwards and the update), or call zo_plugins.ZOOptimizer yourself."
            )
        optimizers = self.optimizers  # type: ignore[attr-defined]
        if len(optimizers) != 1:
            raise ValueError(
                f"ZO strategies need exactly one optimizer from configure_optimizers (got {len(optimizers)}); "
                "return one optimizer whose param groups hold the trainable parameters."
            )
        if trainer.gradient_clip_val:
            logger.warning(
                "gradient_clip_val=%s has no effect under ZO training: there is no gradient tensor to clip "
                "(the update is lr * g * z with the scalar g). Remove it or leave it; it is ignored.",
                trainer.gradient_clip_val,
            )
        self.zo_optimizer = self.zo_driver.build(optimizers[0], module)
        scaler = getattr(self.precision_plugin, "scaler", None)  # type: ignore[attr-defined]
        self.zo_driver.loss_scale = (
            (lambda: float(scaler.get_scale())) if scaler is not None else (lambda: None)
        )
        if self._zo_loaded is not None:
            self._zo_load(self._zo_loaded)
        self._zo_step_started = None

    # ------------------------------------------------------------------ the three overrides
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        driver = self.zo_driver
        if driver.optimizer is None or not torch.is_grad_enabled():
            return self._zo_base.training_step(self, *args, **kwargs)
        module = self.lightning_module  # type: ignore[attr-defined]
        step = module.trainer.global_step
        if self._zo_step_started != step:  # the first micro-batch of an optimizer step
            self._zo_step_started = step
            driver.reset_step()
            driver.sync(self.optimizers[0])  # type: ignore[attr-defined]
        capture = _LogCapture(module)
        holder: dict[str, Any] = {}

        def closure() -> Any:
            holder.pop("out", None)  # drop the previous forward's outputs first
            with capture.capture():
                out = self._zo_base.training_step(self, *args, **kwargs)
            holder["out"] = out
            if out is None:  # the user skipped this batch
                return float("nan")
            return _extract_loss(out)

        est, loss = driver.micro_batch(closure, step, self.root_device)  # type: ignore[attr-defined]
        capture.replay(est.calls)  # the perturbed calls; not the core's one-time validation call
        out = holder.get("out")
        if out is None:
            driver.outstanding -= 1  # Lightning skips backward for a None output
            return None
        return _replace_loss(out, loss)

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.zo_driver.optimizer is None:
            return self._zo_base.backward(self, closure_loss, optimizer, *args, **kwargs)
        module = self.lightning_module  # type: ignore[attr-defined]
        self.pre_backward(closure_loss)  # type: ignore[attr-defined]
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)  # type: ignore[attr-defined]
        # The graph is leaf -> clone -> (/ accumulate_grad_batches) [-> * loss scale]: no parameter
        # is in it, so this "backward" only delivers the factor to the hook on the leaf.
        closure_loss.backward()
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)  # type: ignore[attr-defined]
        self.post_backward(closure_loss)  # type: ignore[attr-defined]
        return closure_loss

    def optimizer_step(
        self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        if self.zo_driver.optimizer is None:
            return self._zo_base.optimizer_step(self, optimizer, closure, model, **kwargs)
        model = model or self.lightning_module  # type: ignore[attr-defined]
        # closure() (last micro-batch: training_step + backward), then on_before_optimizer_step
        # and the clipping hooks, exactly as the stock precision plugin runs them.
        result = self.precision_plugin._wrap_closure(model, optimizer, closure)  # type: ignore[attr-defined]
        self._zo_update(optimizer)
        optimizer.step()  # no .grad anywhere: a no-op that keeps lr_scheduler bookkeeping quiet
        return result

    # ------------------------------------------------------------------ update
    def _zo_update(self, optimizer: Any) -> None:
        module = self.lightning_module  # type: ignore[attr-defined]
        step = module.trainer.global_step
        metrics = self.zo_driver.finish(step, optimizer)
        self._zo_step_started = None
        self._zo_log(module, metrics)

    def _zo_log(self, module: pl.LightningModule, metrics: dict[str, float]) -> None:
        if getattr(module, "_trainer", None) is None:
            return
        prev = module._current_fx_name
        module._current_fx_name = "optimizer_step"  # the hook this runs in; log() validates it
        try:
            for name, value in metrics.items():
                if math.isfinite(value):
                    module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
        finally:
            module._current_fx_name = prev

    # ------------------------------------------------------------------ abort
    def on_exception(self, exception: BaseException) -> None:
        """An exception or interrupt ended ``fit``: drop the half-accumulated step (the
        weights are already unperturbed: the ZO estimate never leaves them perturbed)."""
        self.zo_driver.abort()
        self._zo_step_started = None
        base = getattr(self._zo_base, "on_exception", None)
        if base is not None:
            base(self, exception)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self.zo_driver.optimizer is not None:
            # offloaded blocks hold their last update pending until the next visit; the
            # checkpoint's state dict views the same tensors, so applying it now is what is saved
            self.zo_driver.optimizer.flush()
            checkpoint[ZO_CHECKPOINT_KEY] = {
                "state": self.zo_driver.state_dict(),
                "config": self.zo_config.to_dict(),
                # Lightning does not checkpoint the global RNG: keep it so dropout masks
                # after a resume are the ones the uninterrupted run draws
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            }
            self.zo_driver.optimizer.sync_trajectory()
        self._zo_base.save_checkpoint(self, checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            checkpoint = self._zo_base.load_checkpoint(self, checkpoint_path, weights_only=weights_only)
        except RuntimeError as e:
            if "map_location" not in str(e):
                raise
            # torchao's tensor subclasses (a quantized model's weights) cannot be rebuilt under
            # Lightning's default callable map_location: load onto the strategy's device instead
            checkpoint = self.checkpoint_io.load_checkpoint(  # type: ignore[attr-defined]
                checkpoint_path,
                map_location=self.root_device,  # type: ignore[attr-defined]
                weights_only=weights_only,
            )
        self._zo_loaded = checkpoint.get(ZO_CHECKPOINT_KEY)
        if self._zo_loaded is not None and self._zo_loaded.get("rng_cpu") is not None:
            # continue the saved RNG stream from here, before the loop draws from it again
            # (a new epoch's DataLoader iterator draws its base seed, as it did in the run)
            torch.set_rng_state(self._zo_loaded["rng_cpu"])
            if self._zo_loaded.get("rng_cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._zo_loaded["rng_cuda"])
        if self._zo_loaded is not None and self.zo_driver.optimizer is not None:
            self._zo_load(self._zo_loaded)
        return checkpoint

    def teardown(self) -> None:
        if getattr(self, "zo_driver", None) is not None and self.zo_driver.optimizer is not None:
            self.zo_driver.optimizer.close()
        self._zo_base.teardown(self)

    def _zo_load(self, saved: dict[str, Any]) -> None:
        seed = saved.get("config", {}).get("seed", self.zo_config.seed)
        if seed != self.zo_config.seed:
            raise ValueError(
                f"This checkpoint was written with ZO seed={seed} but the strategy has seed="
                f"{self.zo_config.seed}; resume with the same seed to continue the direction sequence."
            )
        if "state" in saved:
            self.zo_driver.load_state_dict(saved["state"])
        else:  # a checkpoint of zo_plugins <= 0.1: counters only
            logger.warning(
                "This checkpoint has no ZO optimizer state (written by an older zo_plugins): optimizer=%r's "
                "state starts afresh.",
                self.zo_config.optimizer,
            )
            assert self.zo_driver.optimizer is not None
            self.zo_driver.optimizer.skipped_steps = int(saved.get("skipped_steps", 0))


def _zo_config(kwargs: dict[str, Any], allow_rest: bool) -> tuple[ZOConfig, dict[str, Any]]:
    config, rest = ZOConfig.from_kwargs(kwargs)
    if rest and not allow_rest:
        raise TypeError(
            f"ZOStrategy got unknown argument(s) {sorted(rest)}; it takes device, accelerator, "
            f"checkpoint_io, precision_plugin and the ZOConfig fields {list(ZOConfig.field_names())}."
        )
    return config, rest


class ZOStrategy(ZOMixin, SingleDeviceStrategy):
    """Zeroth-order training on one device: ``L.Trainer(strategy=ZOStrategy(eps=1e-3))``.

    Accepts every ``ZOConfig`` field as a keyword (``eps``, ``seed``, ``n_queries``,
    ``distribution``, ``dropout``, ``perturbation``, ...; ``inspect.signature`` lists them).  ``device`` defaults to the Trainer's (``accelerator=`` / ``devices=``).
    The learning rate, weight decay and scheduler come from ``configure_optimizers``.
    """

    strategy_name = "zo"

    def __init__(
        self,
        device: str | torch.device | None = None,
        accelerator: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        ranking_oracle: Callable[[list[Any]], Any] | None = None,
        mask_fn: Callable[[str, torch.Tensor, int], torch.Tensor | None] | None = None,
        **zo_config_fields: Any,
    ) -> None:
        config, _ = _zo_config(zo_config_fields, allow_rest=False)
        super().__init__(
            device="cpu" if device is None else device,
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._device_given = device is not None
        self._zo_init(config, SingleDeviceStrategy, ranking_oracle=ranking_oracle, mask_fn=mask_fn)

    # The Trainer's accelerator connector hands `parallel_devices` to strategies that have
    # the attribute: that is how the device comes from `Trainer(accelerator=, devices=)`.
    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return [self._root_device] if self._device_given else None

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if not devices:
            return
        if len(devices) != 1:
            raise ValueError(
                f"ZOStrategy runs on one device but the Trainer asks for {len(devices)} "
                f"({[str(d) for d in devices]}); use zo_plugins.lightning.ZODDPStrategy for several."
            )
        self._root_device = torch.device(devices[0])
        self._device_given = True


def _with_zo_signature(cls: type, base_init: Callable[..., Any], keep_var_keyword: bool) -> type:
    """Expose every ``ZOConfig`` field as a keyword-only parameter of ``cls.__init__`` so
    ``inspect.signature`` (and LightningCLI / jsonargparse YAML) sees them, while the code
    takes them through ``**zo_config_fields`` and never falls behind ``ZOConfig``."""
    import dataclasses

    sig = inspect.signature(base_init)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    var_kw = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    hints = typing.get_type_hints(ZOConfig)
    zo = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
        for f in dataclasses.fields(ZOConfig)
    ]
    tail = var_kw if keep_var_keyword else []
    cls.__init__.__signature__ = sig.replace(parameters=params + zo + tail)  # type: ignore[attr-defined]
    return cls


_with_zo_signature(ZOStrategy, ZOStrategy.__init__, keep_var_keyword=False)


class ZODDPStrategy(ZOMixin, DDPStrategy):
    """Zeroth-order data-parallel training: ``L.Trainer(strategy=ZODDPStrategy(eps=1e-3),
    devices=N)``.  DDP stays in place but idle (the forwards run under ``no_grad``, so no
    gradient bucket fires); one all-reduce of ``n_queries + 1`` float64 values per optimizer
    step averages the projected gradient, and every rank applies the same update.

    Takes every ``ZOConfig`` field and every ``DDPStrategy`` argument as keywords.
    """

    strategy_name = "zo_ddp"

    def __init__(
        self, *, ranking_oracle: Callable | None = None, mask_fn: Callable | None = None, **kwargs: Any
    ) -> None:
        config, rest = _zo_config(kwargs, allow_rest=True)
        super().__init__(**rest)
        self._zo_init(config, DDPStrategy, ranking_oracle=ranking_oracle, mask_fn=mask_fn)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Lightning's ``DistributedSampler`` arguments: per rank, or per pair of ranks under
        ``perturbation_parallel=True`` (both ranks of a pair read the same batches)."""
        kwargs = DDPStrategy.distributed_sampler_kwargs.fget(self)
        if self.zo_config.perturbation_parallel:
            world, rank = kwargs["num_replicas"], kwargs["rank"]
            if world % 2:
                raise ValueError(
                    f"ZODDPStrategy(perturbation_parallel=True) pairs the processes; the world size is {world}. "
                    "Use an even number of devices."
                )
            kwargs = dict(kwargs, num_replicas=world // 2, rank=rank // 2)
        return kwargs


_with_zo_signature(ZODDPStrategy, DDPStrategy.__init__, keep_var_keyword=True)


class ZOModelParallelStrategy(ZOMixin, ModelParallelStrategy):
    """Zeroth-order training of an FSDP2-sharded model: ``L.Trainer(strategy=
    ZOModelParallelStrategy(eps=1e-3), devices=N)`` with a ``configure_model`` that applies
    ``fully_shard`` over ``self.device_mesh["data_parallel"]`` (Lightning's ModelParallel
    recipe).  Each rank perturbs and updates its own shards (``core.sharding``); the step's one
    collective averages the projected gradients over the data-parallel ranks.

    Takes every ``ZOConfig`` field and every ``ModelParallelStrategy`` argument as keywords.
    Tensor parallelism (``tensor_parallel_size > 1``) is not supported: its DTensors are not
    sharded by rows."""

    strategy_name = "zo_model_parallel"

    def __init__(
        self, *, ranking_oracle: Callable | None = None, mask_fn: Callable | None = None, **kwargs: Any
    ) -> None:
        config, rest = _zo_config(kwargs, allow_rest=True)
        super().__init__(**rest)
        self._zo_init(config, ModelParallelStrategy, ranking_oracle=ranking_oracle, mask_fn=mask_fn)

    def setup_environment(self) -> None:
        # "auto" means FSDP2 over every process here: ZO has no tensor-parallel path
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = 1
        if self._tensor_parallel_size != 1:
            raise ValueError(
                f"ZOModelParallelStrategy(tensor_parallel_size={self._tensor_parallel_size}): ZO supports FSDP2's "
                "row sharding only, not tensor parallelism; use tensor_parallel_size=1."
            )
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        ModelParallelStrategy.setup_environment(self)


_with_zo_signature(ZOModelParallelStrategy, ModelParallelStrategy.__init__, keep_var_keyword=True)


_EQUIPPABLE = (SingleDeviceStrategy, DDPStrategy)


class ZOLightningCallback(Callback):
    """ZO with ``strategy="auto"``, ``"single_device"`` or ``"ddp"``:
    ``L.Trainer(callbacks=[ZOLightningCallback(eps=1e-3)])``.

    At ``setup`` the ``ZOMixin`` methods are bound onto the Trainer's own strategy instance
    (its class is left alone); ``teardown`` removes them again.  Strategies other than the
    single-device and DDP families (FSDP, DeepSpeed, ...) are refused with a sentence that
    names them.  Equivalent to ``ZOStrategy`` / ``ZODDPStrategy`` bit for bit (tested).
    """

    def __init__(
        self,
        *,
        ranking_oracle: Callable[[list[Any]], Any] | None = None,
        mask_fn: Callable[[str, torch.Tensor, int], torch.Tensor | None] | None = None,
        **zo_config_fields: Any,
    ) -> None:
        self.config = ZOConfig(**zo_config_fields)
        self._driver_kwargs = {"ranking_oracle": ranking_oracle, "mask_fn": mask_fn}
        self._bound: list[str] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, ZOMixin):
            raise ValueError(
                f"ZOLightningCallback and the ZO strategy {type(strategy).__name__} were both given; "
                "use one of them."
            )
        if not isinstance(strategy, _EQUIPPABLE):
            raise ValueError(
                f"ZOLightningCallback works with the single-device and DDP strategies, not "
                f"{type(strategy).__name__}; use strategy='auto' or 'ddp', or for a sharded model "
                "strategy=zo_plugins.lightning.ZOModelParallelStrategy() (FSDP2 from configure_model)."
            )
        if self.config.perturbation_parallel:
            raise ValueError(
                "ZOLightningCallback cannot run perturbation_parallel=True: both ranks of a pair must read the "
                "same batches, which needs the strategy's sampler arguments. Use "
                "strategy=zo_plugins.lightning.ZODDPStrategy(perturbation_parallel=True)."
            )
        if stage != "fit" or self._bound:
            return
        for name, fn in vars(ZOMixin).items():
            if inspect.isfunction(fn):
                setattr(strategy, name, types.MethodType(fn, strategy))
                self._bound.append(name)
        strategy._zo_init(self.config, type(strategy), **self._driver_kwargs)  # type: ignore[attr-defined]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unbind(trainer.strategy)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning calls the strategy's on_exception after the callbacks': let it drop the
        # half-accumulated step first, then unbind (teardown does not run after an exception)
        strategy = trainer.strategy
        if "on_exception" in strategy.__dict__:
            strategy.on_exception(exception)
        self._unbind(strategy)

    def _unbind(self, strategy: Any) -> None:
        for name in self._bound:
            strategy.__dict__.pop(name, None)
        self._bound = []
        for attr in ("zo_optimizer", "zo_driver", "zo_config", "_zo_base", "_zo_loaded", "_zo_step_started"):
            strategy.__dict__.pop(attr, None)


StrategyRegistry.register(
    "zo", ZOStrategy, description="Zeroth-order (MeZO) training on one device", override=True
)
StrategyRegistry.register(
    "zo_ddp", ZODDPStrategy, description="Zeroth-order (MeZO) data-parallel training", override=True
)
StrategyRegistry.register(
    "zo_model_parallel",
    ZOModelParallelStrategy,
    description="Zeroth-order (MeZO) training of an FSDP2-sharded model",
    override=True,
)
