"""The adapter model and its bookkeeping: the tuner, adapted layers, matching, routing, tying, weights, combination."""
