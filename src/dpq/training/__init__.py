"""Training: the loop (:mod:`.loop`) and beside it the time planner (:mod:`.budget`), the
epoch checkpoints and run folder (:mod:`.checkpoints`), multi-process agreement
(:mod:`.ddp`), augmentation (:mod:`.augment`), and the workflows that load data, train and
report (:mod:`.experiments`: demo, train, reproduce).

(The package is ``training``, not ``train``: ``dpq.train`` is the function of the package
face.)"""
