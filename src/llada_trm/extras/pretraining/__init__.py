"""`llada-trm pretrain`: train (or continue) a backbone as a run of the one training loop, with its targets.

Modules: `config` (the schema, and the run config it maps onto), `run` (the starting backbone, what the loop
gets from a pretraining: datasets, token weights, random padding, validation targets, stop_at), `targets`
(what an evaluation measures), `export` (test-split figures, the saved backbone), `card` (its model card).
"""
