"""Benchmark: the seed-style training loop against the pipeline's, and both against this machine.

``pipeline bench`` (``make bench``) times, in one process, with torch's thread setting:

(a) the **seed-style loop** the student report used: a torchvision-style per-sample dataset (uint8
    image -> PIL -> ToTensor -> Normalize), ``DataLoader(batch_size=256)``, autograd and the
    hand-written update, with a ``.item()`` per batch and a DataLoader pass over the validation set
    every epoch;
(b) ``pipeline.train.train`` on the same split held as one tensor: same model (an MLP with ReLU),
    same update, same batches (both draw ``torch.randperm`` from the training seed each epoch), so
    the two end at the same weights, which the bench checks;
(b') (b) under bfloat16 autocast (``precision = "bf16"``);
and (b) again on one thread. Loops are interleaved (a, b, b', a, b, b', ...) so a change in the
machine's load hits all of them alike.

It reports seconds per epoch (median of repeats) and per 30-epoch trial, the speed-up (a)/(b), the
achieved GFLOP/s and that as a share of a large fp32 matmul timed in the same run with the same
number of threads. FLOPs per
epoch, per training example: 2*MACs forward + 2*MACs for the weight gradients + 2*(MACs - first
layer's MACs) for the input gradients (none are needed for the input itself); per validation
example: 2*MACs. Also: the study overhead (a small study with MLflow and reports vs the same
trials' bare training), bf16's accuracy cost on Fashion-2, population training on the 2-D data,
and with ``--pruning`` the median pruner's saving on a 40-trial Fashion-2 study. Results go to
``reports/bench/`` (bench.csv: the speed table; bench.md; bench.json: everything, with provenance).

Modules: ``speed`` (the loops and the matmul rate), ``studies`` (overheads, population, pruning,
start-up), ``run`` (the run, its table and its files).
"""
