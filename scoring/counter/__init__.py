"""The traced MicroNet counter: runs a model on real inputs and counts what executes.

Every aten op is seen by the tracer (:mod:`~scoring.counter.tracer`); module hooks keep a stack of module names, so
each op is attributed to the innermost module that ran it (:mod:`~scoring.counter.modules`). Per tensor the counter
tracks (:mod:`~scoring.counter.facts`):

* whether it is *static* (derived only from parameters, buffers and constants): ops on static tensors are
  free (they would be precomputed at export: masks times weights, weight fake-quantization, batch-norm
  folding arithmetic), and a static tensor consumed by a real op is a stored value (a parameter,
  :mod:`~scoring.counter.storage`);
* its bit tag, set by quantizer modules (:mod:`scoring.protocol`) and kept through data movement;
* the mask a module declared on it (``micronet_mask_bits``), kept through static ops of the same size
  (a weight quantizer, views) up to the conv/linear that stores it;
* the op that produced it, so that a batch norm whose input comes from a conv/linear folds into it, and the
  conv/linear outputs it holds unchanged, so that every other op reading them is seen (decided after tracing: a
  fold stands only if no other reader of that output, bar an unfolded batch norm, and no other use of that stored
  weight needs it unscaled; :mod:`~scoring.counter.folding`);
* the parameters it derives from, so each stored value is counted once over all batches;
* whether it is an *index* tensor (integer token ids and what is computed from them alone): address
  arithmetic on index tensors is free.

Recurrent layers are counted where torch's composite functions are called (:mod:`~scoring.counter.recurrent`).
Costs come from the rules table (:mod:`scoring.rules`), each op counted by the handler of its rule's kind
(:mod:`~scoring.counter.kinds`); an op with no rule raises :class:`~scoring.rules.UnsupportedOpError`. Widths are
resolved after tracing, once the freebie is known (:mod:`~scoring.counter.result`). :func:`count_model` counts per
example (an image); :func:`count_stream` per token of a stream fed on-line.

Part of the judge: imports torch and scoring's core modules (rules, protocol, errors) only.
"""
from scoring.counter.counting import count_inputs, count_model, count_stream
from scoring.counter.recurrent import recurrences
from scoring.counter.result import Count

__all__ = ["Count", "count_inputs", "count_model", "count_stream", "recurrences"]
