"""Tasks: everything that makes one task differ from another, defined in one place.

A task config (``conf/task/<name>.yaml``) names its ``kind``; :func:`build_task` returns that kind's
:class:`Task`, which owns

* the task's data: training, validation and test loaders (:meth:`Task.loaders`),
* its evaluation: exact sums over a split, never a rounded mean (:meth:`Task.evaluate` → :class:`Evaluation`),
* what the scorer runs per example (:meth:`Task.score_inputs`, :attr:`Task.example`: an image of a batch, or
  one token of a stream fed on-line),
* what a registry model must be told about the task's input (:meth:`Task.model_kwargs`).

``train/run.py``, the scoring command line and ``verify`` all go through this definition, so adding a task adds
a config file and the code of what is new; nothing in the pipeline asks which task it runs. The gate, the
baseline and the metric a task is judged on are the challenge's rules and live in the judge's table
(``scoring/challenge.py``), keyed by the task's name; a kind's :attr:`Task.metric` names what its evaluation measures,
and a test checks that every task's kind measures what the judge gates it on.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .datasets import DatasetError
from .loaders import Loaders, build_loaders
from .streams import EvalStream, TrainStreams, zipf_tokens
from .wikitext import Corpus, load_wikitext103
from .wikitext_demo import load_wikitext_demo


@dataclass(frozen=True)
class DataOptions:
    """Where the data is and how it is loaded (the run config's ``data.*``, with every ``auto`` resolved)."""

    root: str | None = None
    download: bool = False
    num_workers: int = 0
    pin_memory: bool = False
    gpu_resident: bool = False
    #: Validation hold-out from the training data: a fraction in (0, 1) or a count; 0 = none.
    val_split: float | int = 0


@dataclass(frozen=True)
class Evaluation:
    """Exact sums of one pass over a split: ``total`` examples (images, or predicted tokens), their summed
    negative log-likelihood in float64, and for classification the number of correct top-1 predictions."""

    split: str
    total: int
    loss_sum: float
    correct: int | None = None

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per example."""
        return self.loss_sum / self.total if self.total else math.nan

    @property
    def accuracy(self) -> float | None:
        """Top-1 accuracy, for classification."""
        return None if self.correct is None else self.correct / self.total

    @property
    def perplexity(self) -> float:
        """exp(mean NLL): the language-modelling metric."""
        return math.exp(self.loss)

    def describe(self) -> str:
        """One phrase for logs: ``val 341/360 = 0.9472, loss 0.2154`` or ``val perplexity 212.3 (loss 5.358)``."""
        if self.correct is not None:
            return f"{self.split} {self.correct}/{self.total} = {self.accuracy:.4f}, loss {self.loss:.4f}"
        return f"{self.split} perplexity {self.perplexity:.2f} (loss {self.loss:.4f} over {self.total:,} tokens)"

    def to_dict(self) -> dict[str, Any]:
        """The sums and the derived metric, as report.json records them."""
        metrics: dict[str, Any] = {"split": self.split, "total": self.total, "loss_sum": self.loss_sum,
                                   "loss": self.loss}
        if self.correct is not None:
            metrics.update(correct=self.correct, top1=self.accuracy)
        else:
            metrics["perplexity"] = self.perplexity
        return metrics


@dataclass(frozen=True)
class ScoreInputs:
    """What the scorer runs a model on: a batch of examples, or a token stream fed on-line (one token per
    example, state carried) whose first ``warmup`` tokens only fill the state and are not counted."""

    inputs: torch.Tensor
    stream: bool = False
    warmup: int = 0


def read_in_shares(loader: Any) -> bool:
    """Whether the processes read ``loader`` together, each its own share (its ``world_size`` > 1); a loader one
    process reads whole (the test split's, a language model's stream, any outside torchrun) is not."""
    return getattr(loader, "world_size", 1) > 1


def _sum_over_shares(tensor: torch.Tensor, loader: Any) -> torch.Tensor:
    """Sum over the processes that share ``loader``, each having read its own share; a loader one process reads
    whole is summed already."""
    if read_in_shares(loader):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class Task(ABC):
    """A task: its data, evaluation and scorer inputs (see the module docstring). One subclass per ``kind``."""

    #: The ``kind`` of conf/task/*.yaml this class serves.
    kind: ClassVar[str]
    #: What one example of the scorer is: ``"image"`` (one element of a batch) or ``"token"`` (fed on-line).
    example: ClassVar[str]
    #: What this kind's evaluation measures: a key of :meth:`Evaluation.to_dict` ("top1" or "perplexity").
    metric: ClassVar[str]
    #: Keys of the task config (dotted) that shape training batches only: an entrant's recipe, which ``verify``
    #: lets differ from the kit's task definition (every other key must match it).
    training_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self.name: str = config["name"]
        self.dataset: str = config["dataset"]
        self.num_classes: int = int(config["num_classes"])

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every registry model gets for this task's input, besides ``num_classes``."""
        return {}

    @abstractmethod
    def loaders(self, options: DataOptions, *, batch_size: int, eval_batch_size: int, seed: int,
                distributed: bool = False, device: torch.device | None = None) -> Loaders:
        """Training, validation (None without one) and test loaders. Under torchrun (``distributed``) each process
        trains and validates on its share; the test loader is the whole split on every process, evaluated and
        counted by one, so a run's report does not depend on how many processes trained it."""

    @abstractmethod
    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device, split: str) -> Evaluation:
        """Exact sums of ``model`` over ``loader``, in eval mode and fp32; over every share of a split that several
        processes read in shares (a loader's ``world_size``), a collective call then."""

    @abstractmethod
    def score_inputs(self, loader: Iterable, examples: int, device: torch.device, model: nn.Module) -> ScoreInputs:
        """What the scorer runs ``model`` on: the first ``examples`` examples of ``loader``."""

    @abstractmethod
    def score_examples_available(self, loader: Any) -> int | None:
        """How many examples the scorer can take from the split of ``loader``, known before there is a model; None
        where only the model can tell (:meth:`score_inputs` then checks)."""

    @abstractmethod
    def synthetic_inputs(self, model: nn.Module, *, input_size: int | None = None, seed: int = 0) -> ScoreInputs:
        """Scorer inputs without the data, to count an untrained architecture (``python -m scoring --model``)."""


class ClassificationTask(Task):
    """Image classification (digits, CIFAR-100, ImageNet): top-1 on exact correct/total."""

    kind = "classification"
    example = "image"
    metric = "top1"
    training_keys = frozenset(f"augment.{key}" for key in (
        "crop_padding", "hflip", "auto_augment", "cutout", "mixup", "cutmix", "random_resized_crop"))

    def model_kwargs(self) -> dict[str, Any]:
        return {"in_chans": int(self.config["in_chans"])}

    def loaders(self, options: DataOptions, *, batch_size: int, eval_batch_size: int, seed: int,
                distributed: bool = False, device: torch.device | None = None) -> Loaders:
        return build_loaders(self.dataset, root=options.root, batch_size=batch_size, eval_batch_size=eval_batch_size,
                             augment=self.config.get("augment"), num_workers=options.num_workers,
                             pin_memory=options.pin_memory, download=options.download, seed=seed,
                             distributed=distributed, device=device, gpu_resident=options.gpu_resident,
                             val_split=options.val_split)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device, split: str) -> Evaluation:
        was_training = model.training
        model.eval()
        counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, total
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for inputs, targets in loader:
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            outputs = model(inputs).float()
            loss_sum += F.cross_entropy(outputs, targets, reduction="sum")
            counts[0] += (outputs.argmax(dim=1) == targets).sum()
            counts[1] += targets.numel()
        model.train(was_training)
        correct, total = _sum_over_shares(counts, loader).tolist()
        return Evaluation(split, total, _sum_over_shares(loss_sum, loader).item(), correct)

    def score_inputs(self, loader: Iterable, examples: int, device: torch.device, model: nn.Module) -> ScoreInputs:
        batches, seen = [], 0
        for inputs, _ in loader:
            batches.append(inputs)
            seen += len(inputs)
            if seen >= examples:
                break
        return ScoreInputs(torch.cat(batches)[:examples].to(device))

    def score_examples_available(self, loader: Any) -> int | None:
        """Every image of the split."""
        return loader.dataset_size

    def synthetic_inputs(self, model: nn.Module, *, input_size: int | None = None, seed: int = 0) -> ScoreInputs:
        """One random image of the task's shape (``input_size`` replaces its height = width)."""
        size = int(self.config["input_size"]) if input_size is None else input_size
        generator = torch.Generator().manual_seed(seed)
        return ScoreInputs(torch.randn(1, int(self.config["in_chans"]), size, size, generator=generator))


#: The corpora of language-modelling tasks, by the task's ``dataset``: ``root -> Corpus``.
CORPORA = {"wikitext103": load_wikitext103, "wikitext_demo": lambda root: load_wikitext_demo()}


class LanguageModelTask(Task):
    """Word-level language modelling (WikiText-103, the embedded Wikipedia demo): perplexity on the exact NLL sum.

    Training reads the train stream as ``batch_size`` parallel streams per process in BPTT windows of
    ``stream.bptt`` tokens (optionally of variable length), the state carried from window to window
    (:mod:`data.streams`); the validation split is the corpus's valid file. Evaluation reads a whole split as one
    sequence, batch of one, state carried and never reset, the first token context only (the rules' on-line
    perplexity): windows of ``stream.eval_window`` tokens are only a faster way to feed it, the same NLL for any
    window (a model contract, tested). The scorer counts one token per example, fed on-line, after
    ``mem_len`` tokens (the model's attention memory, 0 for recurrent models) have filled the state, so every
    counted token attends to what it will attend to at steady state.
    """

    kind = "language_model"
    example = "token"
    metric = "perplexity"
    training_keys = frozenset({"stream.bptt", "stream.variable"})

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        stream = config.get("stream") or {}
        self.bptt, self.eval_window = int(stream.get("bptt", 0)), int(stream.get("eval_window", 0))
        self.variable_bptt = bool(stream.get("variable", False))

    def corpus(self, root: str | None) -> Corpus:
        """The task's corpus, its vocabulary checked against ``num_classes`` (the models' output size)."""
        if self.dataset not in CORPORA:
            raise ValueError(f"task {self.name}: unknown language-modelling dataset {self.dataset!r}; "
                             f"known: {', '.join(CORPORA)}")
        corpus = CORPORA[self.dataset](root)
        if corpus.vocab_size != self.num_classes:
            raise DatasetError(f"task {self.name} declares num_classes={self.num_classes} but its corpus has "
                               f"{corpus.vocab_size:,} types ; fix: set task.num_classes={corpus.vocab_size} "
                               "(the models' output size is the vocabulary size)")
        return corpus

    def loaders(self, options: DataOptions, *, batch_size: int, eval_batch_size: int, seed: int,
                distributed: bool = False, device: torch.device | None = None) -> Loaders:
        if options.val_split:
            raise ValueError(f"data.val_split={options.val_split}: task {self.name} validates on its corpus's valid "
                             "file, which is its validation split; set data.val_split=0")
        if eval_batch_size != 1:
            raise ValueError(f"train.eval_batch_size={eval_batch_size}: task {self.name} evaluates each split as one "
                             f"stream with its state carried; {eval_batch_size} streams would restart the state at "
                             "each cut and change the NLL; set train.eval_batch_size=1 (task.stream.eval_window "
                             "sets how many tokens each evaluation step feeds)")
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        if rank:  # rank 0 tokenizes and caches first; the others then read its cache
            dist.barrier()
        corpus = self.corpus(options.root)
        if distributed and not rank:
            dist.barrier()
        train = TrainStreams(corpus.train, batch_size, self.bptt, variable=self.variable_bptt, seed=seed, rank=rank,
                             world_size=world_size)
        return Loaders(train, EvalStream(corpus.valid, self.eval_window), EvalStream(corpus.test, self.eval_window))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device, split: str) -> Evaluation:
        # Every process evaluates the whole stream (state carried, so it cannot be split): no reduction.
        was_training = model.training
        model.eval()
        nll_sum = torch.zeros((), dtype=torch.float64, device=device)
        state, predicted = None, 0
        for inputs, targets in loader:
            nll, state = model(inputs.to(device), state, targets.to(device))
            nll_sum += nll.double().sum()
            predicted += targets.numel()
        model.train(was_training)
        return Evaluation(split, predicted, nll_sum.item())

    def score_inputs(self, loader: Iterable, examples: int, device: torch.device, model: nn.Module) -> ScoreInputs:
        warmup = int(getattr(model, "mem_len", 0))
        windows, seen = [], 0
        for inputs, _ in loader:
            windows.append(inputs)
            seen += inputs.shape[1]
            if seen >= warmup + examples:
                break
        if seen < warmup + examples:
            raise ValueError(f"score.examples={examples} tokens after a warm-up of {warmup} (the model's mem_len) "
                             f"exceed the {seen:,} tokens of the test stream; lower score.examples")
        return ScoreInputs(torch.cat(windows, dim=1)[:, :warmup + examples].to(device), stream=True, warmup=warmup)

    def score_examples_available(self, loader: Any) -> int | None:
        """None: the scorer's tokens come after a warm-up as long as the model's memory (``mem_len``)."""
        return None

    #: Tokens counted on synthetic inputs.
    SYNTHETIC_TOKENS = 64

    def synthetic_inputs(self, model: nn.Module, *, input_size: int | None = None, seed: int = 0) -> ScoreInputs:
        """:data:`SYNTHETIC_TOKENS` tokens after the model's memory, drawn by Zipf's law over the vocabulary
        (ids are frequency-sorted), so the adaptive input's clusters are hit roughly as real text hits them."""
        if input_size is not None:
            raise ValueError(f"task {self.name} feeds tokens: --input-size does not apply")
        warmup = int(getattr(model, "mem_len", 0))
        tokens = zipf_tokens(warmup + self.SYNTHETIC_TOKENS, self.num_classes, seed=seed)
        return ScoreInputs(torch.from_numpy(tokens.astype("int64"))[None], stream=True, warmup=warmup)


#: Every task kind, by the ``kind`` key of conf/task/*.yaml.
TASK_KINDS: Mapping[str, type[Task]] = {cls.kind: cls for cls in (ClassificationTask, LanguageModelTask)}


def build_task(config: Mapping[str, Any]) -> Task:
    """The :class:`Task` of a (resolved) task config; ValueError names the known kinds."""
    kind = config.get("kind")
    if kind not in TASK_KINDS:
        raise ValueError(f"task {config.get('name')!r} has kind {kind!r}; known kinds: {', '.join(TASK_KINDS)}")
    return TASK_KINDS[kind](config)
