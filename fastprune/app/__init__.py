"""The application: the `fastprune` command (`cli`), the prune and eval workflows it parses its
flags into (`workflow`), the local multi-process launcher (`launch`), zero-shot evaluation
through lm-evaluation-harness (`zeroshot`), the one-layer demo (`demo`) and saving a pruned
model (`saving`)."""
