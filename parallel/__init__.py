"""The parallel engine: ranks, groups, communication and parallel layers; model-agnostic."""
