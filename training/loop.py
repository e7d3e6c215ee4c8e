"""The training loop: host-agnostic, so the same code trains ComfyUI models and the tiny model.

The host hands over the frozen network (an `nn.Module` to inject adapters into) and `ModelFns`
(training/objective.py): how to pick noise levels, add noise, and predict the denoised image x0.
`Trainer.step()` is one optimizer step, in nanoGPT's order: LR → per micro-batch: seeded batch
choice, the objective's loss (noise, levels, forward under autocast, weighting), backward,
accumulated → finiteness check (and clipping) → optimizer step → zero_grad. `Trainer.state()` is
everything a later step depends on: step, losses, LR, the LoRA, the optimizer state and the RNG
state, so that a run can be checkpointed and resumed bit-exactly (`load_state`; files:
training/resume.py). `train()` injects the adapters, loops over `step()`, measures the validation
loss, and hands states to the hooks: each step, every `save_every` steps, and on a cancel or a
NaN loss (the last good state), so a stopped run can be resumed. Under torch.distributed (torchrun)
the same loop trains data-parallel: each process trains its share of every batch and the gradients
are summed before the step (training/distributed.py); the host gives the writing hooks to rank 0.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from ..lora import (DTYPES, MODULE_PATHS, BaseModel, LayerWeights, LoraConfig, LoraNetwork, LoraStateDict, Naming,
                    inject, network_metadata, to_state_dict)
from ..lora.metadata import PREFIX, dataset_metadata, expert_metadata, session_metadata
from ..lora.targets import TEXT_ENCODER_TARGET
from .checkpointing import training_forward
from .config import TrainConfig
from .data import BatchOrder, Samples, flatten_latents, group_by_shape, oversized_batch_note
from .distributed import Shard, all_reduce_gradients, any_rank, sum_over_ranks
from .distributed import current as current_shard
from .dropout import Dropout, any_dropout
from .ema import Ema, restored
from .objective import ModelFns, Objective, output_coefficient
from .optim import lr_at, make_optimizer, set_lr

log = logging.getLogger(__name__)

__all__ = ["GradientPass", "Hooks", "ModelFns", "TextEncoderPart", "TrainResult", "TrainState", "Trainer",
           "TrainingDiverged", "Validator", "lora_config_of", "output_coefficient", "train"]


@dataclass
class TrainState:
    """A run after `step` optimizer steps: what the next step depends on, plus its history.

    Tensors are the live ones (views, not copies): clone them to keep a checkpoint. `lora` maps
    module path → fp32 master weights; `optimizer` is `optimizer.state_dict()`; `rng` holds the
    run's generator state (batch choice, noise, levels, caption dropout) under "generator" and,
    when dropout is on, the forward pass's RNG under "forward"; `pending` the rest of an epoch pass;
    `ema` the EMA's averages by parameter name (training/ema.py), None without one. `shown` (not
    saved): enter it to have the adapters hold the weights to evaluate (`Trainer.evaluation`).
    """

    step: int  # optimizer steps completed in this run
    total_steps: int  # + the earlier steps of a continued LoRA
    loss: float  # of the last step (nan before the first)
    lr: float  # of the last step (the first step's before it)
    losses: list[float]
    lora: dict[str, LayerWeights]
    optimizer: dict
    rng: dict[str, torch.Tensor]
    pending: list[int]
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    ema: dict[str, torch.Tensor] | None = None
    shown: Callable[[], AbstractContextManager] | None = None

    @property
    def existing_steps(self) -> int:
        """The steps of a continued LoRA before this run."""
        return self.total_steps - self.step


class Router(Protocol):
    """Picks each optimizer step's expert (training/experts.py): `pick` returns the objective the step draws
    and predicts with (an expert's, in its noise range); `current` names the expert it picked last."""

    current: str | None

    def pick(self, generator: torch.Generator) -> Objective: ...


class Validator(Protocol):
    """A held-out loss (training/validation.py): measured every `every` steps, deterministic, no_grad."""

    every: int

    def loss(self) -> float: ...


@dataclass
class Hooks:
    """on_start(state) before the first step (after a resume: at the resumed step); on_step(state)
    after each optimizer step; should_cancel() before each; save(state, lora, reason) writes a
    checkpoint (reason "every", "cancel" or "diverged") and returns where it went, for messages. A
    `cancel_errors` exception raised inside a step (ComfyUI raises its interrupt from inside the
    model) cancels like should_cancel: the step is undone and the last completed one is kept."""

    on_step: Callable[[TrainState], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    on_start: Callable[[TrainState], None] | None = None
    save: Callable[[TrainState, LoraStateDict, str], str] | None = None
    cancel_errors: tuple[type[BaseException], ...] = ()  # raised inside a step, they mean a cancel (ComfyUI's)


@dataclass
class TrainResult:
    lora: dict[str, torch.Tensor]  # kohya-layout state dict in the config's lora_dtype
    losses: list[float]  # one per completed optimizer step of this run
    total_steps: int  # earlier steps of a continued LoRA + steps completed now
    cancelled: bool = False
    metadata: dict[str, str] = field(default_factory=dict)  # for the file: lora/metadata.py
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    checkpoint: str | None = None  # where a cancel wrote its checkpoint (Hooks.save's answer)
    experts: list[str] = field(default_factory=list)  # noise-range experts (training/experts.py): each step's


@dataclass(frozen=True)
class TextEncoderPart:
    """A text encoder trained beside the network (kohya's text-encoder LoRA): its module, the prefix its layers'
    paths get (lora/naming.py `TEXT_ENCODER_PARTS`: `text_encoder.`, `text_encoder_2.`) and the device its
    layers compute on (None: where its weights are). The host's `denoise` runs it on each step's captions."""

    module: nn.Module
    prefix: str
    device: torch.device | None = None


class TrainingDiverged(FloatingPointError):
    """The loss or a gradient became NaN/inf; `last_good` holds the LoRA of the last finite step."""

    def __init__(self, message: str, last_good: TrainResult | None):
        super().__init__(message)
        self.last_good = last_good


class GradientPass:
    """The gradient of one optimizer step: `gradient_accumulation` micro-batches, each split into same-shape
    groups, each group's loss (training/objective.py) weighted by its share and backpropagated. `samples`
    (training/data.py): what the batch order draws (None: each image a sample of its own, unmasked).
    `regular`: the images of the regularisation set; each row of a batch is one of them, drawn uniformly,
    with probability prior_ratio, its loss weighted by prior_loss_weight (DreamBooth's prior preservation).
    `bypass`: a context with the adapters off, for the preservation losses. `router` (training/experts.py):
    picks each optimizer step's expert, whose objective draws in its noise range; None: one model."""

    def __init__(self, fns: ModelFns, images: list[torch.Tensor], config: TrainConfig, generator: torch.Generator,
                 shard: Shard | None = None, samples: Samples | None = None, regular: Sequence[int] = (),
                 bypass: Callable[[], AbstractContextManager] | None = None, router: Router | None = None):
        self.images, self.config, self.generator, self.shard = images, config, generator, shard
        self.samples = samples or Samples.plain(len(images) - len(regular))
        self.regular = list(regular)
        self.batches = BatchOrder(len(self.samples), config.batch_size, config.batch_order)
        self.objective = Objective(fns, config, images[0].device, bypass)
        self.router = router

    def run(self, arm: Callable[[bool], None] | None = None) -> float:
        """Backward over the micro-batches; returns their mean loss (with a `shard`: this process's
        share of it, and its gradients are its share of the batch's: training/distributed.py).
        `arm` (step_in_backward): told before each backward whether it is the step's last, the one
        whose gradients the optimizer steps on as they are made (earlier groups' accumulate first)."""
        total, accum = 0.0, self.config.gradient_accumulation
        objective = self.router.pick(self.generator) if self.router is not None else self.objective
        for _ in range(accum):
            indices = self.samples.pick(self.batches.next(self.generator), self.generator)
            if self.regular:
                indices = self.mix_regular(indices)
            groups = group_by_shape(indices, self.images)
            for n, group in enumerate(groups):
                if arm is not None:
                    arm(n == len(groups) - 1)
                # weight each same-shape group by its share so the gradient is the batch mean
                x0 = torch.stack([self.images[i] for i in group]).float()
                rows = self.shard.rows(len(group)) if self.shard is not None else None
                weights = self.image_weights(group) if self.regular else None
                loss = objective.loss(x0, group, self.generator, rows, self.samples.masks_of(group, x0), weights)
                if loss is not None:  # None: none of this group's rows are this process's
                    loss = loss * (len(group) / len(indices) / accum)
                    if self.config.step_in_backward:  # backward steps the adapters: check the loss before it
                        value = loss.item()
                        if not math.isfinite(value):
                            return value
                        loss.backward()
                        total += value
                        continue
                    loss.backward()
                    total += loss.item()
        return total

    def mix_regular(self, indices: list[int]) -> list[int]:
        """The batch with each row swapped, with probability prior_ratio, for a regularisation image."""
        swap = (torch.rand(len(indices), generator=self.generator) < self.config.prior_ratio).tolist()
        picks = torch.randint(len(self.regular), (len(indices),), generator=self.generator).tolist()
        return [self.regular[p] if s else i for i, s, p in zip(indices, swap, picks)]

    def image_weights(self, group: list[int]) -> torch.Tensor:
        first = self.regular[0]
        return torch.tensor([self.config.prior_loss_weight if i >= first else 1.0 for i in group])


class Trainer:
    """One run over an injected network: `step()` trains one optimizer step, `state()` tells where it stands.

    The caller owns the patching (`inject`, `training_forward`); `train()` is the usual caller.
    """

    def __init__(self, network: LoraNetwork, fns: ModelFns, images: list[torch.Tensor], config: TrainConfig,
                 existing_steps: int = 0, shard: Shard | None = None, samples: Samples | None = None,
                 regular: Sequence[int] = (), router: Router | None = None):
        self.network, self.config, self.existing_steps, self.shard = network, config, existing_steps, shard
        if config.step_in_backward and shard is not None:
            raise ValueError("step_in_backward: each process would step before the gradients are summed over the "
                             "processes; turn step_in_backward off under torchrun")
        self.params = [p for p in network.parameters()]
        self.optimizer = make_optimizer(network.named_parameters(), config,
                                        {id(p) for p in network.joined_parameters()})
        self.generator = torch.Generator().manual_seed(config.seed)
        self.gradients = GradientPass(fns, images, config, self.generator, shard, samples, regular, network.bypassed,
                                      router)
        self.experts: list[str] = []  # with a router: the expert each completed step trained
        self.dropout = Dropout(network, config, images[0].device) if any_dropout(config) else None
        self.ema = Ema(dict(network.named_parameters()), config) if config.ema_decay else None
        self.losses: list[float] = []
        self.validation: list[tuple[int, float]] = []
        self.lr = lr_at(0, config)

    @property
    def step_count(self) -> int:
        return len(self.losses)

    def step(self) -> float:
        """One optimizer step; returns its loss. Raises TrainingDiverged (no LoRA attached) on NaN/inf."""
        step = self.step_count
        # what the step draws from: put back on NaN/inf, so state() stays the last good state
        before = (self.generator.get_state(), list(self.gradients.batches.pending), self.lr,
                  dict(self.dropout.state) if self.dropout is not None else None)
        self.lr = lr_at(step, self.config)
        set_lr(self.optimizer, self.lr)
        try:
            with self.dropout.active() if self.dropout is not None else nullcontext():
                loss = self.gradients.run(getattr(self.optimizer, "arm", None))
        except BaseException:  # e.g. a cancel raised inside the model: the step did not happen
            self.optimizer.zero_grad(set_to_none=True)
            self._restore(before)
            raise
        if self.shard is not None:  # every process gets the batch's gradient and loss: all step alike
            all_reduce_gradients(self.params)
            loss = sum_over_ranks(loss)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.config.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        else:  # only the finiteness check: no rescaling pass over every gradient
            grad_norm = torch.nn.utils.get_total_norm(grads)
        if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._restore(before)
            fp32_hint = " or set training_dtype to fp32" if self.config.training_dtype != "fp32" else ""
            raise TrainingDiverged(
                f"Train LoRA: the loss became {loss} at step {self.existing_steps + step + 1}; "
                f"lower learning_rate (now {self.config.learning_rate}){fp32_hint}", None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss)
        if self.gradients.router is not None:
            self.experts.append(self.gradients.router.current)
        if self.ema is not None:
            self.ema.update(self.step_count)
        return loss

    def _restore(self, before: tuple) -> None:
        self.generator.set_state(before[0])
        self.gradients.batches.pending, self.lr = before[1], before[2]
        if self.dropout is not None:
            self.dropout.state = before[3]

    def state(self) -> TrainState:
        return TrainState(
            step=self.step_count, total_steps=self.existing_steps + self.step_count,
            loss=self.losses[-1] if self.losses else math.nan, lr=self.lr, losses=self.losses,
            lora=self.network.weights(), optimizer=self.optimizer.state_dict(),
            rng={"generator": self.generator.get_state(), **(self.dropout.state if self.dropout else {})},
            pending=list(self.gradients.batches.pending), validation=list(self.validation),
            ema=self.ema.state() if self.ema is not None else None, shown=lambda: self.evaluation(saving=False))

    @contextmanager
    def evaluation(self, saving: bool) -> Iterator[None]:
        """The adapters hold the weights to evaluate (`saving` False: previews, the validation loss) or to
        save inside the block: the EMA's averages where ema_evaluate / ema_save asks for them, else
        schedule-free's averaged point; the trained values are back, bit-exact, after it."""
        config = self.config
        if self.ema is not None and (config.ema_save if saving else config.ema_evaluate):
            with self.ema.applied():
                yield
            return
        if config.optimizer != "AdamWScheduleFree":
            yield
            return
        with restored(self.params):  # exactly, not through its lerp back
            self.optimizer.eval()
            try:
                yield
            finally:
                self.optimizer.train()  # its flag

    def load_state(self, state: TrainState) -> None:
        """Continue from `state` (of a run with the same config and images): the next step is
        bit-identical to the one the original run took after it. ValueError (naming `resume`) if
        its LoRA's layers are not this network's."""
        ours = self.network.weights()
        _check_layers(state.lora, ours)
        with torch.no_grad():
            for path, weights in state.lora.items():
                for suffix, tensor in weights.tensors.items():
                    ours[path].tensors[suffix].copy_(tensor)
        self.optimizer.load_state_dict(state.optimizer)
        self.generator.set_state(state.rng["generator"])
        if self.dropout is not None:
            self.dropout.state = {k: v for k, v in state.rng.items() if k.startswith("forward")}
        self.gradients.batches.pending = list(state.pending)
        if self.ema is not None:
            self.ema.load(state.ema or {})
        self.losses = list(state.losses)
        self.validation = list(state.validation)
        self.lr = state.lr


def train(
    net: nn.Module,
    fns: ModelFns,
    latents: torch.Tensor | Sequence[torch.Tensor],
    config: TrainConfig,
    *,
    checkpoint_blocks: Sequence[nn.Module] = (),
    existing: dict[str, LayerWeights] | None = None,
    existing_steps: int = 0,
    hooks: Hooks | None = None,
    base: BaseModel | None = None,
    resume: TrainState | None = None,
    validator: Validator | None = None,
    samples: Samples | None = None,
    regularization: torch.Tensor | Sequence[torch.Tensor] | None = None,
    text_encoders: Sequence[TextEncoderPart] = (),
) -> TrainResult:
    """Train a LoRA on `net` and return it; `net` is left exactly as it was, also on error.

    `existing` (module path → LayerWeights) continues a LoRA, whose `existing_steps` count on.
    `base` names the model for the file: its layer naming (lora/naming.py) and metadata.
    `resume` continues a run from its state (training/resume.py checks that it fits first): the
    LoRA, optimizer, RNG and data order are the state's, and steps count on to `config.steps`.
    `validator` measures a held-out loss before the first step and every `validator.every` steps.
    `samples` (training/data.py) groups the images into what a batch draws (kohya repeats, a flipped copy
    and caption variants as alternatives) and carries their masks; None: one sample per image, no mask.
    `regularization`: the regularisation set's latents, mixed into the batches (`GradientPass`); the
    host's `denoise` gets them as the image indices after the training latents'.
    `text_encoders`: trained too, at text_encoder_lr (which must be above 0 exactly when some are given),
    their layers named as kohya names them in the file and restored exactly as `net` is; `existing` and
    `resume` may hold their layers (paths with the part's prefix).
    Raises TrainingDiverged when the loss turns NaN/inf (suggesting a lower LR or fp32), after
    `hooks.save` wrote the last good state.
    """
    started = time.time()  # ss_training_started_at
    images = flatten_latents(latents)
    samples = samples or Samples.plain(len(images))
    samples.check(images)
    regular: list[int] = []
    if regularization is not None:
        extra = flatten_latents(regularization, "regularization latents")
        regular = list(range(len(images), len(images) + len(extra)))
        images = images + extra
    Objective(fns, config, images[0].device)  # refuses options this model cannot take, before patching it
    note = oversized_batch_note(config.batch_size, len(samples), config.batch_order)
    if note:
        log.warning(note)
    if bool(config.text_encoder_lr) != bool(text_encoders):
        raise ValueError(f"text_encoder_lr: got {config.text_encoder_lr}, but "
                         f"{'no text encoder is' if config.text_encoder_lr else 'text encoders are'} given to train; "
                         f"{'connect one or set text_encoder_lr to 0' if config.text_encoder_lr else 'set it above 0'}")
    existing = existing or {}
    prefixes = tuple(part.prefix for part in text_encoders)
    ours = {path: w for path, w in existing.items() if not path.startswith(prefixes)} if prefixes else existing
    naming = base.naming if base is not None else MODULE_PATHS
    if text_encoders:
        naming = naming.with_text_encoders(len(text_encoders))
    # Adapters live where the layers compute (the latents' device), not where offloaded weights rest.
    with inject(net, lora_config_of(config), seed=config.seed, weights=ours, device=images[0].device) as network, \
            training_forward(net, checkpoint_blocks, config.gradient_checkpointing) as forward:
        join_text_encoders(network, text_encoders, config, existing)
        if resume is not None:
            existing_steps = resume.existing_steps
        trainer = Trainer(network, fns, images, config, existing_steps, current_shard(), samples, regular)
        if resume is not None:
            trainer.load_state(resume)
        shown = [images[alternatives[0]] for alternatives in samples.alternatives]  # the file counts samples
        run = _Run(trainer, hooks or Hooks(), validator, resume.step if resume is not None else 0, (shown, base, started, naming))
        return run.loop(forward)


class _Run:
    """One call of `train()` over a Trainer: the loop, the validation loss, checkpoints, cancel."""

    def __init__(self, trainer: Trainer, hooks: Hooks, validator: Validator | None, resumed_at: int,
                 describe: tuple[list[torch.Tensor], BaseModel | None, float, Naming]) -> None:
        """`describe`: what the file's metadata needs beside the run (the images, the base, the start time, the
        layers' naming)."""
        self.trainer, self.hooks, self.validator, self.resumed_at = trainer, hooks, validator, resumed_at
        self.config, self.describe = trainer.config, describe
        self.start = trainer.step_count

    def loop(self, forward) -> TrainResult:
        """Validate the start, then step until `config.steps`: cancel checks before each step, the
        validation loss and checkpoints after it, the hooks told of each."""
        trainer, hooks, config = self.trainer, self.hooks, self.config
        if not self.validate_start():
            return self.cancel()  # nothing new to write: save() keeps only steps taken in this call
        if hooks.on_start is not None:
            hooks.on_start(trainer.state())
        while trainer.step_count < config.steps:
            cancelled = hooks.should_cancel is not None and hooks.should_cancel()
            if any_rank(cancelled) if trainer.shard is not None else cancelled:  # one process's cancel stops all
                return self.cancel()
            try:
                trainer.step()
            except hooks.cancel_errors:
                return self.cancel()
            except TrainingDiverged as err:
                where = self.save("diverged")
                kept = f"; the last good LoRA and training state are in {where}" if where else ""
                raise TrainingDiverged(str(err) + kept, self.result()) from None
            step = trainer.step_count
            if step == self.start + 1:
                log.info("Train LoRA: %s", forward.describe())
            if self.validation_due(step) and not self.validate():
                return self.cancel()
            if config.save_every and (step % config.save_every == 0 or step == config.steps):
                self.save("every")
            if hooks.on_step is not None:
                hooks.on_step(trainer.state())
        return self.result()

    def result(self, cancelled: bool = False, checkpoint: str | None = None) -> TrainResult:
        """The LoRA as of the last completed step, with its file metadata."""
        (images, base, started, naming), trainer, config = self.describe, self.trainer, self.config
        total = trainer.existing_steps + trainer.step_count
        with trainer.evaluation(saving=True):
            sd = to_state_dict(trainer.network.weights(), DTYPES[config.lora_dtype], naming)
            sd = {k: v.clone() for k, v in sd.items()}  # fp32 on the CPU shares the adapters' storage
            share = trainer.network.difference_share()
        meta = _metadata(config, total, sd, images, base, share, started, len(trainer.gradients.regular))
        return TrainResult(LoraStateDict(sd, meta), list(trainer.losses), total, cancelled, meta,
                           list(trainer.validation), checkpoint)

    def save(self, reason: str) -> str | None:
        """A checkpoint through the hooks; None when there is nothing new since the start (or the resumed state)."""
        if self.hooks.save is None or (reason != "every" and self.trainer.step_count == self.resumed_at):
            return None
        return self.hooks.save(self.trainer.state(), self.result().lora, reason)

    def cancel(self) -> TrainResult:
        """The last completed step, written to resume from."""
        return self.result(cancelled=True, checkpoint=self.save("cancel"))

    def validation_due(self, step: int) -> bool:
        return self.validator is not None and (step % self.validator.every == 0 or step == self.config.steps)

    def validate_start(self) -> bool:
        """The curve's starting point (after a resume, the resumed step's, if a cancel came inside its
        measuring); False if a cancel came inside it."""
        measured = {step for step, _ in self.trainer.validation}
        return not self.validation_due(self.start) or self.start in measured or self.validate()

    def validate(self) -> bool:
        """Measure the validation loss; False if a cancel came inside it (the step itself is complete)."""
        try:
            with self.trainer.evaluation(saving=False):
                loss = self.validator.loss()
        except self.hooks.cancel_errors:
            return False
        self.trainer.validation.append((self.trainer.step_count, loss))
        return True


def _check_layers(saved: dict[str, LayerWeights], ours: dict[str, LayerWeights]) -> None:
    """The layers, tensor names and shapes of a saved LoRA are this network's; else ValueError naming the first."""
    fix = "it was made for another model or with other layer settings; connect that model, or clear resume"
    for what, paths in (("lacks", sorted(set(saved) - set(ours))), ("has no state for", sorted(set(ours) - set(saved)))):
        if paths:
            raise ValueError(f"resume: this model {what} {len(paths)} layers of the training state (first: "
                             f"{paths[0]}); {fix}")
    for path, weights in saved.items():
        for suffix, tensor in weights.tensors.items():
            mine = ours[path].tensors.get(suffix)
            if mine is None or mine.shape != tensor.shape:
                got = "missing" if mine is None else tuple(mine.shape)
                raise ValueError(f"resume: {path}.{suffix} is {tuple(tensor.shape)} in the training state but {got} "
                                 f"here; {fix}")


def join_text_encoders(network: LoraNetwork, parts: Sequence[TextEncoderPart], config: TrainConfig,
                       existing: dict[str, LayerWeights] | None = None) -> None:
    """Inject each text encoder's adapters (its CLIP layers' projections, `TEXT_ENCODER_TARGET`; the algorithm,
    rank and patterns of the network's; `existing` layers continued) and join them to `network`."""
    te_config = replace(lora_config_of(config), target=TEXT_ENCODER_TARGET, train_norms=False, train_biases=False)
    for part in parts:
        network.join(inject(part.module, te_config, seed=config.seed, weights=existing, device=part.device,
                            prefix=part.prefix))


def lora_config_of(config: TrainConfig) -> LoraConfig:
    """The LoraConfig a TrainConfig injects: algorithm, target, ranks, patterns, switches."""
    return LoraConfig(rank=config.rank, alpha=config.network_alpha or None, algorithm=config.algorithm, target=config.target,
                      conv_rank=config.conv_rank or None, conv_alpha=config.conv_alpha or None,
                      factor=config.lokr_factor, include=config.include_layers or None,
                      exclude=config.exclude_layers or None,
                      train_norms=config.train_norms, train_biases=config.train_biases)


def _metadata(config: TrainConfig, total_steps: int, sd: dict[str, torch.Tensor], images: Sequence[torch.Tensor],
              base: BaseModel | None, difference_share: float, started: float, reg_images: int = 0) -> dict[str, str]:
    """What training knows for the file's metadata (lora/metadata.py states the keys): made when the
    LoRA is taken (the end of the run, or a checkpoint), which is its ss_training_finished_at. Image
    sizes are the latents' × the base model's pixel scale (without a base, the latents' own)."""
    sizes = [tuple(x.shape[-2:]) for x in images]
    return {**config.kohya_metadata(len(images), total_steps, reg_images), **network_metadata(sd, config.network_args()),
            **(base.metadata() if base is not None else {}),
            **dataset_metadata(sizes, base.pixel_scale if base is not None else 1),
            **session_metadata(started, time.time()), "ss_steps": str(total_steps),
            PREFIX + "settings": json.dumps(config.as_metadata()), PREFIX + "lora_dtype": config.lora_dtype,
            PREFIX + "difference_share": f"{difference_share:.6f}", PREFIX + "weights": saved_weights(config),
            **(expert_metadata(config.expert, config.expert_boundary) if config.expert != "none" else {})}


def saved_weights(config: TrainConfig) -> str:
    """Which weights a file of this run holds: "ema" (the EMA's averages, training/ema.py), "schedule-free
    average" (AdamWScheduleFree's averaged point) or "trained" (the adapters as trained)."""
    if config.ema_decay and config.ema_save:
        return "ema"
    return "schedule-free average" if config.optimizer == "AdamWScheduleFree" else "trained"
