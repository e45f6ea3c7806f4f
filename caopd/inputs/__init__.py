"""Stage 1, inputs: dataset rows (``data``); the student prompt and teacher contexts (``prompts``)."""
