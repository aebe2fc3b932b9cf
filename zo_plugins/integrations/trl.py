"""TRL integration: ``ZOSFTTrainer``, TRL's ``SFTTrainer`` trained with ZO.

TRL builds the SFT loss outside the model's forward -- from ``outputs.log_probs`` of a fused
LM head that reads ``lm_head.weight`` directly -- so ``ZOCallback``'s forward wrapper cannot
serve it.  ``ZOSFTTrainer`` wraps ``compute_loss`` instead (``ZOTrainerMixin``): every loss
type, completion-only masks, packing and PEFT adapters are TRL's own, and the fused head sees
the perturbed head weights (``OutOfPlace`` substitutes them where the head is read).

TRL's per-call bookkeeping is corrected for the extra forwards: the ``num_tokens`` count
advances once per micro-batch, not once per perturbed forward.
"""

from __future__ import annotations

from typing import Any

try:
    from trl import SFTTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "zo_plugins.ZOSFTTrainer needs TRL: pip install 'zo-plugins[trl]' (or pip install 'trl>=1.16')."
    ) from e

from .hf import ZOTrainerMixin

__all__ = ["ZOSFTTrainer"]


class ZOSFTTrainer(ZOTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` with zeroth-order training: the same arguments, plus
    ``zo_config=ZOConfig(...)`` or a dict (or a ``ZOCallback`` in ``callbacks``).

    ``ZOSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, peft_config=LoraConfig(...),
    zo_config={"eps": 1e-3})``.  On a CPU, TRL's default ``bf16=True`` needs ``use_cpu=True`` or
    ``bf16=False``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with self._zo_init(args, kwargs):
            super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counting = model.training and hasattr(self, "_total_train_tokens")
        before = self._total_train_tokens if counting else 0
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        calls = getattr(self._zo_callback().driver, "last_calls", 1) if counting else 1
        if counting and calls > 1:  # TRL counted the batch's tokens once per perturbed forward
            self._total_train_tokens = before + (self._total_train_tokens - before) // calls
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return out
