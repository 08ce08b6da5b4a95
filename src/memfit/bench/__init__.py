"""Benchmarks: workloads × methods, side by side in one process, written as JSON and a markdown table."""
