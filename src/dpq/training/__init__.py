"""Training: the loop (:mod:`.loop`) and beside it its parts, each testable alone: what a step
reads (:mod:`.batches`, :mod:`.augment`), optimizers, learning rates and the weight average
(:mod:`.optim`), codebooks from the training features (:mod:`.codebook_init`), the epoch plan
under a time budget (:mod:`.budget`), what a checkpoint records and a resume restores
(:mod:`.resume`; the files: :mod:`.checkpoints`), what the ranks of a multi-process run agree
on (:mod:`.agreement`; primitives: :mod:`.ddp`), data checks and divergence stops
(:mod:`.guards`), the lines it logs (:mod:`.log_lines`); and the workflows that load data,
train and report (:mod:`.experiments`: demo, train; :mod:`.reproduce`: the CIFAR-10 protocol).

(The package is ``training``, not ``train``: ``dpq.train`` is the function of the package
face.)"""
