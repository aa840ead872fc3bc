"""Benchmarks, the synthetic ImageNet generator and other tools around imgprep."""
