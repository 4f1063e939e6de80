"""`llada-trm pretrain`: train (or continue) a backbone as a run of the one training loop (`run`)."""
