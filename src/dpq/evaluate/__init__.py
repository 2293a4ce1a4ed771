"""How well a method retrieves: every method a searcher scored on one feature set
(:mod:`.retrieval`; the rows and their searchers :mod:`.rows`, the feature set
:mod:`.feature_set`, what comes back :mod:`.results`), whole evaluations from files on disk
(:mod:`.workflows`), the metrics (:mod:`.metrics`), tables and figures (:mod:`.report`), and
the classic baselines (:mod:`.baselines`)."""
