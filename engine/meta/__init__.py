"""Meta-learning: MAML/MAML++ learner, super-net meta-training with progressive shrinking, evaluation."""
