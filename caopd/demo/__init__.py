"""``caopd demo``: the generated task (``task``), the supervised warm-up (``warmup``), the pipeline (``pipeline``)."""
