"""What a researcher reads from runs: the comparison (`llada-trm compare`), its report and the plots."""
